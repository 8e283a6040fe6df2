"""How ``benchmarks/calibrate_scan.py`` picks each family's noise budget: the budget the library
ships as its default comes out of this choice, so it is tested like library code."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from timm_purify.detection.ban import ScanOptionError


@pytest.fixture(scope="module")
def cal(benchmark_script):
    return benchmark_script("calibrate_scan")


def _row(cal, name: str, opts, a2o: float, *, attack: str | None = None, mode: str | None = None) -> dict:
    key = f"{name}|scan0|n600" + "".join(f"|{k}={v}" for k, v in sorted(cal.non_default(opts).items()))
    return {
        "key": key,
        "attack": attack,
        "mode": mode,
        "acc": 0.8,
        "asr": None if attack is None else 0.95,
        "norm_family": "batchnorm",
        "scan_options": asdict(opts),
        "statistics": {"all_to_one": a2o, "all_to_all": 0.0},
    }


def _zoo(cal, opts, clean: list[float], backdoored: list[float]) -> list[dict]:
    rows = [_row(cal, f"clean{i}", opts, v) for i, v in enumerate(clean)]
    return rows + [
        _row(cal, f"bad{i}", opts, v, attack="badnets", mode="all-to-one") for i, v in enumerate(backdoored)
    ]


def test_the_budget_with_the_fewest_errors_is_chosen(cal):
    args = cal.parse_args(["--eps-candidates", "batchnorm:0.75,0.3"])
    options = cal.scan_options(args)
    candidates = cal.budget_candidates(args, options)
    low, high = candidates["batchnorm"]
    assert (low.eps, high.eps) == (0.3, 0.75)  # sorted, whatever order they were given in
    assert [o.eps for o in candidates["other"]] == [0.3]  # no candidates: its --scan-option budget
    rows = _zoo(cal, low, [0.10, 0.20], [0.15, 0.50]) + _zoo(cal, high, [0.20, 0.25], [0.40, 0.60])
    # a model scanned at one budget only is left out of the comparison, not counted against it
    rows.append(_row(cal, "extra", low, 0.9))
    kept, chosen, selection = cal.choose_budgets(rows, candidates, options, args)
    assert chosen["batchnorm"].eps == 0.75
    assert selection["batchnorm"]["chosen"] == 0.75
    assert selection["batchnorm"]["candidates"]["0.3"]["errors"] == 1
    assert selection["batchnorm"]["candidates"]["0.75"]["errors"] == 0
    assert (selection["batchnorm"]["compared_models"], selection["batchnorm"]["skipped_models"]) == (4, 1)
    assert kept and all(r["scan_options"]["eps"] == 0.75 for r in kept)


def test_ties_go_to_fewer_false_alarms_then_the_wider_margin(cal):
    args = cal.parse_args(["--eps-candidates", "0.3,0.5"])
    options = cal.scan_options(args)
    candidates = cal.budget_candidates(args, options)
    a, b = candidates["batchnorm"]
    # one error each: a flags a clean model, b misses a backdoor
    rows = _zoo(cal, a, [0.1, 0.5], [0.3, 0.4, 0.6]) + _zoo(cal, b, [0.1, 0.2], [0.05, 0.7, 0.8])
    _, chosen, selection = cal.choose_budgets(rows, candidates, options, args)
    fits = selection["batchnorm"]["candidates"]
    assert (fits["0.3"]["false_positives"], fits["0.5"]["missed"]) == (1, 1)
    assert chosen["batchnorm"].eps == 0.5
    # both separate: the wider all-to-one margin wins, here the larger budget
    rows = _zoo(cal, a, [0.1, 0.2], [0.25, 0.3]) + _zoo(cal, b, [0.1, 0.2], [0.5, 0.6])
    _, chosen, selection = cal.choose_budgets(rows, candidates, options, args)
    assert chosen["batchnorm"].eps == 0.5
    assert selection["batchnorm"]["candidates"]["0.5"]["all_to_one_margin"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("layernorm:0.3,0.5", SystemExit, "unknown family"),
        ("batchnorm:0.3,big", SystemExit, "not \\[FAMILY:\\]EPS"),
        ("batchnorm:", SystemExit, "names no budget"),
        ("0.3,1.5", ScanOptionError, "below 1"),
    ],
)
def test_bad_candidate_lists_are_refused(cal, value, error, match):
    args = cal.parse_args(["--eps-candidates", value])
    with pytest.raises(error, match=match):
        cal.budget_candidates(args, cal.scan_options(args))


@pytest.mark.parametrize(
    "argv",
    [
        ["--archs", "test_resnet", "--out", "/tmp/x.json", "--rescore"],
        ["--archs", "test_resnet", "--out=/tmp/x.json", "--rescore"],
        ["--archs", "test_resnet", "--rescore"],
    ],
)
def test_the_recorded_command_leaves_out_the_output_path(cal, argv):
    assert cal.recorded_command(argv) == "python benchmarks/calibrate_scan.py --archs test_resnet --rescore"
