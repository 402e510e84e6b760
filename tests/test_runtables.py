"""compare's per-run tables read from run directories: damaged files."""

from __future__ import annotations

import json

from cafedist import runtables


def test_a_metrics_line_with_bytes_that_are_no_utf8_is_passed_over_as_a_torn_one(tmp_path):
    """Damage in one run's metrics.jsonl ended compare in a traceback (UnicodeDecodeError)
    after every training, at each rerun, writing no report."""
    rows = [json.dumps({"round": r, "acc_per_exit": [0.1 * r, 0.2 * r]}).encode() + b"\n" for r in range(3)]
    (tmp_path / "metrics.jsonl").write_bytes(rows[0] + b"\xff\xfe damaged\n" + rows[1] + rows[2])
    assert [r["round"] for r in runtables.read_curve(tmp_path)] == [0, 1, 2]
