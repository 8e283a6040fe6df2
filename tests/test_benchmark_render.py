"""``benchmarks/run.py --render``: RESULTS.md shows, per model, attack and method, the row
measured last, whatever the names of the files the rows sit in."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("run")


def _row(asr: float, finished: str | None) -> dict:
    row = {
        "suite": "full",
        "arch": "resnet18",
        "attack": "badnets",
        "method": "awm",
        "seed": 0,
        "acc": 0.9,
        "asr": asr,
        "ra": 0.1,
        "der": 0.6,
        "seconds": 1.0,
        "config": {},
        "environment": {"torch": "x"},
    }
    if finished is not None:
        row["finished"] = finished
    return row


def test_the_row_measured_last_wins_over_file_order(bench, tmp_path):
    # "b-old.json" sorts after "a-new.json" but holds an untimed (older) row
    (tmp_path / "a-new.json").write_text(json.dumps({"rows": [_row(0.12, "2026-11-22T13:51:02")]}))
    (tmp_path / "b-old.json").write_text(json.dumps({"rows": [_row(0.73, None)]}))
    (tmp_path / "c-older.json").write_text(json.dumps({"rows": [_row(0.50, "2026-11-21T10:00:00")]}))
    text = bench.render(tmp_path, tmp_path / "RESULTS.md").read_text()
    awm = [line for line in text.splitlines() if line.startswith("| resnet18 | badnets | awm")]
    assert len(awm) == 1
    assert "| 12.00 |" in awm[0]
