"""The README's sample outputs are what the commands print today."""

from __future__ import annotations

from conftest import ROOT, cafedist_in_process


def _block_after(text: str, command: str) -> str:
    """The output block that follows ``command``'s code block in the README."""
    opening = f"```bash\n{command}\n```\n\n```\n"
    start = text.index(opening) + len(opening)
    return text[start:text.index("```", start)]


def test_the_dry_run_sample_is_the_quick_start_configs_output(tmp_path, monkeypatch):
    command = "cafedist train --config configs/quickstart.yaml --dry-run --world-size 4"
    sample = _block_after((ROOT / "README.md").read_text(), command)
    # run where the sample's relative store path (data/stores/...) lands in tmp_path
    argv = ["train", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--dry-run", "--world-size", "4"]
    monkeypatch.chdir(tmp_path)
    proc = cafedist_in_process(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == sample
