"""Tests for cafedist.eval.plots: valid PNGs, atomic writes, clear error without matplotlib."""

from __future__ import annotations

import sys

import pytest
import torch

from cafedist.errors import CafeError
from cafedist.eval import dynamic_counts, dynamic_table, plot_accuracy_vs_macs, plot_per_exit_bars

matplotlib = pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MACS = [1_000_000, 2_500_000, 6_000_000]


def _table(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 3, (3, 30), generator=g)
    conf = torch.rand(3, 30, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    return dynamic_table(dynamic_counts(pred, conf, y, MACS), MACS)


def _assert_only_png(tmp_path, name: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp files left
    assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_accuracy_vs_macs_writes_png(tmp_path, saved_figures):
    out = tmp_path / "acc_vs_macs.png"
    curves = {"cafedistill": _table(0), "fedavg": _table(1)}
    plot_accuracy_vs_macs(curves, out, title="test",
                          per_exit={"cafedistill": ([0.5, 0.6, 0.7], MACS), "depthfl": ([0.4, 0.55, 0.65], MACS)})
    _assert_only_png(tmp_path, out.name)
    (ax,) = saved_figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["cafedistill (dynamic)", "fedavg (dynamic)"]
    for name, rows in curves.items():  # MACs in millions (MMACs), accuracy in percent
        assert lines[f"{name} (dynamic)"].get_xdata() == pytest.approx([r["mean_macs"] / 1e6 for r in rows])
        assert lines[f"{name} (dynamic)"].get_ydata() == pytest.approx([100 * r["accuracy"] for r in rows])
    assert "MMACs" in ax.get_xlabel()
    points = {c.get_label(): c for c in ax.collections}
    assert points["depthfl (exits)"].get_offsets().flatten().tolist() == pytest.approx([1.0, 40.0, 2.5, 55.0, 6.0,
                                                                                       65.0])
    # a method's static exits take its curve's colour
    assert tuple(points["cafedistill (exits)"].get_facecolor()[0][:3]) == pytest.approx(
        matplotlib.colors.to_rgb(lines["cafedistill (dynamic)"].get_color()))
    assert [t.get_text() for t in ax.texts].count("exit 3") == 2


def test_per_exit_bars_writes_png_and_overwrites(tmp_path, saved_figures):
    out = tmp_path / "bars.png"
    out.write_bytes(b"old")
    plot_per_exit_bars({"a": [0.5, 0.6, 0.7], "b": [0.4, 0.5, 0.6, 0.8]}, out, title="bars")
    _assert_only_png(tmp_path, out.name)
    (ax,) = saved_figures[0].axes
    heights = [round(bar.get_height(), 6) for bar in ax.patches]
    assert heights == [50.0, 60.0, 70.0, 40.0, 50.0, 60.0, 80.0]  # a's bars, then b's, in percent
    centres = [bar.get_x() + bar.get_width() / 2 for bar in ax.patches]
    assert centres[:3] == pytest.approx([0.8, 1.8, 2.8]) and centres[3:] == pytest.approx([1.2, 2.2, 3.2, 4.2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["exit 1", "exit 2", "exit 3", "exit 4"]


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "bars.png"
    out.write_bytes(b"old")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_per_exit_bars({"a": [0.5, 0.6]}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png"]
    assert out.read_bytes() == b"old"


def test_missing_matplotlib_raises_cafe_error(tmp_path, monkeypatch):
    # A None entry in sys.modules makes the import fail, as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(CafeError, match=r"pip install 'cafedist\[plot\]'"):
        plot_per_exit_bars({"a": [0.5]}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_plot_input_validation(tmp_path):
    with pytest.raises(ValueError):
        plot_accuracy_vs_macs({}, tmp_path / "a.png")
    with pytest.raises(ValueError, match="per_exit"):
        plot_accuracy_vs_macs({}, tmp_path / "a.png", per_exit={"x": ([0.1, 0.2], [1])})
    with pytest.raises(ValueError):
        plot_per_exit_bars({}, tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


def test_many_series_get_distinct_styles_and_a_side_legend(tmp_path):
    from cafedist.eval.plots import _figure_for, _legend, _series_styles

    for count in (3, 19, 45):
        styles = [(s["color"], s["linestyle"], s["marker"]) for s in _series_styles(count)]
        assert len(set(styles)) == count  # no two methods share a look
        assert all(s["marker"] != "s" for s in _series_styles(count))  # "s" marks the static exits
    for count, beside in ((3, False), (19, True)):
        fig = _figure_for(count)
        ax = fig.add_subplot()
        for i, style in enumerate(_series_styles(count)):
            ax.plot([0, 1], [i, i], label=f"m{i}", **style)
        _legend(fig, ax, count)
        assert (ax.get_legend() is None) == beside and bool(fig.legends) == beside
    curves = {f"method{i}": [{"mean_macs": 1e6 * (k + 1), "accuracy": 0.5 + 0.01 * i + 0.05 * k} for k in range(3)]
              for i in range(19)}
    out = tmp_path / "many.png"
    plot_accuracy_vs_macs(curves, out)
    from PIL import Image  # matplotlib depends on pillow

    width, height = Image.open(out).size
    assert width > 2 * height  # widened (default 6.4 x 4.4 in) for the legend beside the axes
