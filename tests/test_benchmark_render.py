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


def test_a_longer_trained_model_keeps_rows_of_its_own(bench, tmp_path):
    # the same attack and method on the suite's 3-epoch model and on one built with --epochs 8,
    # each run writing its own file with the epochs it trained
    for name, epochs, row in (
        ("suite.json", 3, _row(0.02, "2026-11-22T10:00:00")),
        ("longer.json", 8, _row(0.23, "2026-11-22T12:00:00")),
    ):
        (tmp_path / name).write_text(json.dumps({"suite_config": {"epochs": epochs}, "rows": [row]}))
    lines = bench.render(tmp_path, tmp_path / "RESULTS.md").read_text().splitlines()
    assert [line for line in lines if line.startswith("| resnet18 | badnets | awm")] == [
        "| resnet18 | badnets | awm | 90.00 | 2.00 | 10.00 | 60.00 | 1.0 | - |"
    ]
    assert [line for line in lines if line.startswith("| resnet18 | badnets [8 epochs] | awm")] == [
        "| resnet18 | badnets [8 epochs] | awm | 90.00 | 23.00 | 10.00 | 60.00 | 1.0 | - |"
    ]


def test_the_reach_section_lists_each_family_and_every_model_once(bench, monkeypatch):
    model = {"ban_verdict": "clean", "ban_target": None, "acc": 0.9, "asr": None, "used": True}
    model |= {"norm_family": "other", "ban_eps": 0.3, "spread_score": 0.0}
    rows = [
        {**model, "model": "m-clean", "attack": None, "mode": None, "target": None}
        | {"reach_norm": norm, "reach_rho": rho, "reach_score": 0.02, "reach_target": 6}
        | {"ban_statistics": {"all_to_one": 0.1, "target": 6, "target_masked": 6, "all_to_all": 0.01}}
        for norm, rho in (("l2", 1.0), ("l1", 6.0))
    ] + [
        {**model, "model": "m-bad", "attack": "badnets", "mode": "all-to-one", "target": 0, "asr": 1.0}
        | {"reach_norm": "l2", "reach_rho": 1.0, "reach_score": 0.88, "reach_target": 0}
        | {"ban_statistics": {"all_to_one": 0.41, "target": 0, "target_masked": 0, "all_to_all": 0.05}},
        # BAN and reach miss it; the family's spread reading, counted by the refit, sees it
        {**model, "model": "m-a2a", "attack": "badnets", "mode": "all-to-all", "target": None, "asr": 0.9}
        | {"reach_norm": "l2", "reach_rho": 1.0, "reach_score": 0.05, "reach_target": 3, "spread_score": 0.7}
        | {"ban_statistics": {"all_to_one": 0.12, "target": 3, "target_masked": 3, "all_to_all": 0.02}},
        # a backdoor that did not implant: not used, so the refit read no spread score for it
        {key: value for key, value in model.items() if key != "spread_score"}
        | {
            "model": "m-weak",
            "attack": "blended",
            "mode": "all-to-one",
            "target": 2,
            "asr": 0.2,
            "used": False,
        }
        | {"reach_norm": "l2", "reach_rho": 1.0, "reach_score": 0.05, "reach_target": 3}
        | {"ban_statistics": {"all_to_one": 0.12, "target": 3, "target_masked": 3, "all_to_all": 0.02}},
    ]
    record = {
        "false_positives": 0,
        "clean_models": 1,
        "detected": 1,
        "backdoored_models": 1,
        "targets_correct": 1,
        "all_to_one_models": 1,
    }
    chosen = {
        "norm": "l2",
        "rho": 1.0,
        "target_when_both": "ban",
        "fit": {"threshold": 0.45},
        "errors": 0,
        "errors_ban_alone": 1,
        "errors_best_ban_alone": 1,
        "reliability": record,
        "reliability_ban_alone": {**record, "detected": 0, "targets_correct": 0},
    }
    section = {
        "date": "d",
        "command": "c",
        "rule": "r",
        "models": rows,
        "families": {
            "other": {
                "enabled": True,
                "chosen": {**chosen, "all_to_one_threshold": 0.35, "all_to_all_threshold": None, "eps": 0.3},
                "before_refit": {
                    "all_to_one_threshold": 0.3,
                    "all_to_all_threshold": 0.1,
                    "errors": 2,
                    "eps": 0.75,
                },
                "spread_threshold": 0.4,
                "by_eps": {
                    "0.3": {
                        "errors": 0,
                        "all_to_one_threshold": 0.35,
                        "all_to_all_threshold": None,
                        "reach_threshold": 0.45,
                        "reliability": record,
                    }
                },
            },
            # a refit that found no use for reach keeps BAN's cuts and no reach cut
            "batchnorm": {"enabled": False, "chosen": {**chosen, "fit": None}},
            "groupnorm": {"enabled": False},
        },
        "ban_refitted": ["other"],
        # the LayerNorm fit by a later run than the others'
        "provenance_by_family": {
            "batchnorm": {
                "command": "c-all",
                "date": "d0",
                "fitted_families": ["batchnorm", "groupnorm", "other"],
            },
            "groupnorm": {
                "command": "c-all",
                "date": "d0",
                "fitted_families": ["batchnorm", "groupnorm", "other"],
            },
            "other": {"command": "c", "date": "d"},
        },
    }
    calibration = {
        "reach": section,
        "all_to_one_thresholds": {"other": 0.35},
        "all_to_all_thresholds": {"other": None},
        "target_source_by_family": {"other": "noisy"},
    }
    monkeypatch.setattr("timm_purify.detection.load_calibration", lambda: calibration)
    lines = bench._reach_section()
    assert "| other (with spread) | yes | l2 1 | 0.450 | ban | 0 / 1 | 0/1 | 1/1 (0) | 1/1 (0) |" in lines
    assert "| batchnorm | no | l2 1 | - | - | 0 / 1 | 0/1 | 1/1 (0) | 1/1 (0) |" in lines
    assert "| groupnorm | no | - | - | - | - | - | - | - |" in lines
    # BAN's verdict (of a refitted family: at the shipped cuts, not as scanned), its statistics
    # and budget where stored, then one column per reach budget
    assert (
        "| m-bad | badnets all-to-one | 90.00 | 100.00 | backdoored (0) | 0.410 / 0.050 (eps 0.3) | - | 0.880 (0) "
        "| 0 | yes |" in lines
    )
    assert "| 0.3 | 0.350 | not used | 0.450 | 0/1 | 1/1 | 1/1 | 0 |" in lines
    assert any(
        "BAN's other noise budget and cuts refitted" in line
        and "eps 0.75 -> 0.3, all-to-one 0.300 -> 0.350, all-to-all 0.100 -> not used" in line
        and "errors of both stages 2 -> 0 (the best BAN cuts without reach, spread counted: 1)" in line
        and "includes the spread reading at 0.400" in line
        for line in lines
    )
    # a refit that did not count calibrate_scan.py's cuts (--skip-original-count) says so
    section["families"]["other"]["before_refit"]["errors"] = None
    assert any("errors of both stages not counted -> 0 (" in line for line in bench._reach_section())
    assert any(
        line.startswith("| m-a2a | badnets all-to-all |") and "| backdoored (spread) |" in line
        for line in lines
    )
    assert any(line.startswith("| m-weak | blended all-to-one |") and "| clean |" in line for line in lines)
    assert sum(line.startswith("| m-clean |") for line in lines) == 1
    assert any(
        "regenerate batchnorm, groupnorm with `c-all` (d0), given only its batchnorm, groupnorm models (its other "
        "fit was replaced since); other with `c` (d)." in line
        for line in lines
    )


def test_the_spread_section_lists_each_family_and_every_model_once(bench, monkeypatch):
    model = {"verdict": "clean", "suspected_target": None, "acc": 0.9, "asr": None, "used": True}
    rows = [
        {**model, "model": "m-clean", "norm_family": "other", "attack": None, "mode": None}
        | {"spread_rho": 2.0, "spread_score": 0.0},
        {**model, "model": "m-a2a", "norm_family": "other", "attack": "badnets", "mode": "all-to-all"}
        | {"asr": 0.88, "spread_rho": 2.0, "spread_score": 0.826},
        {**model, "model": "r-a2a", "norm_family": "batchnorm", "attack": "badnets", "mode": "all-to-all"}
        | {"asr": 0.88, "spread_shape": "window", "spread_window": 8, "spread_score": 0.8},
    ]
    record = {
        "false_positives": 0,
        "clean_models": 1,
        "detected": 1,
        "backdoored_models": 1,
        "targets_correct": 0,
        "all_to_one_models": 0,
    }
    chosen = {
        "rho": 2.0,
        "fit": {"threshold": 0.413},
        "errors": 0,
        "errors_before": 1,
        "reliability": record,
        "reliability_before": {**record, "detected": 0},
    }
    section = {
        "date": "d",
        "command": "c",
        "rule": "r",
        "models": rows,
        "families": {
            "other": {
                "enabled": True,
                "chosen": chosen,
                "restarts": 3,  # the l2 reading fitted three times, the best kept
                # a window fit tried beside the L2 one and declined (no fewer errors): listed after it
                "declined": [
                    {
                        "enabled": False,
                        "chosen": {
                            **chosen,
                            "shape": "window",
                            "window": 8,
                            "errors": 1,
                            "fit": {"threshold": 0.334},
                        },
                    }
                ],
            },
            # refitted in the window shape; its l2 fit stays on record
            "batchnorm": {
                "enabled": True,
                "chosen": {**chosen, "shape": "window", "window": 8, "rho": None, "fit": {"threshold": 0.55}},
                "earlier": [
                    {"enabled": False, "reason": "nothing above the clean models", "command": "c-l2"}
                ],
            },
            "groupnorm": {"enabled": False},
        },
        # a later refit of BAN and reach recounted the record the scan quotes
        "reliability_by_family": {
            "other": {**record, "clean_models": 5, "detected": 4, "backdoored_models": 6}
        },
        "recounted_by_family": {"other": {"note": "n", "reliability_before": record}},
    }
    monkeypatch.setattr("timm_purify.detection.load_calibration", lambda: {"spread": section})
    lines = bench._spread_section()
    other = lines.index("| other | yes | L2 2, best of 3 fits | 0.413 | 0 / 1 | 0/1 | 1/1 (0) | 0/0 (0) |")
    assert (
        lines[other + 1]
        == "| other (tried beside it) | no | window 8 | 0.334 | 1 / 1 | 0/1 | 1/1 (0) | 0/0 (0) |"
    )
    assert any(
        line.startswith(
            "other: the table above is calibrate_spread.py's own fit; the record the scan quotes is a recount"
        )
        and "(n): 0/5 clean flagged, 4/6 backdoors detected, 0/0 targets right." in line
        for line in lines
    )
    assert "| groupnorm | no | - | - | - | - | - | - |" in lines
    assert "| batchnorm | yes | window 8 | 0.550 | 0 / 1 | 0/1 | 1/1 (0) | 0/0 (0) |" in lines
    assert "batchnorm, an earlier fit (`c-l2`): nothing above the clean models." in lines
    assert any(
        line.startswith("| model |") and "| spread L2 2 | spread window 8 | used |" in line for line in lines
    )
    assert "| m-a2a | other | badnets all-to-all | 90.00 | 88.00 | clean | 0.826 | - | yes |" in lines
    assert "| r-a2a | batchnorm | badnets all-to-all | 90.00 | 88.00 | clean | - | 0.800 | yes |" in lines
    assert sum(line.startswith("| m-clean |") for line in lines) == 1


def test_detection_rows_from_an_earlier_calibration_are_listed_not_counted(bench, tmp_path):
    """A scan row whose threshold is none of the shipped calibration's cuts for the family
    scanned at its budget was decided by an earlier calibration: the headline leaves it out."""
    from timm_purify.detection import load_calibration

    cal = load_calibration()
    family, eps = next(iter(cal["eps_by_family"].items()))
    cut = cal["all_to_one_thresholds"][family]
    row = {
        "suite": "full", "arch": "a", "attack": "none", "model": "m", "method": "scan", "eps": eps, "seed": 0,
        "truth": "clean", "verdict": "clean", "score": 0.0, "threshold": cut,
        "suspected_target": None, "true_target": None, "pattern": None, "seconds": 1.0,
    }  # fmt: skip
    old = {**row, "seed": 1, "verdict": "backdoored", "score": 1.0, "threshold": cut + 0.01}
    (tmp_path / "r.json").write_text(json.dumps({"suite": "full", "rows": [row, old]}))
    text = bench.render(results_dir=tmp_path, out=tmp_path / "RESULTS.md").read_text()
    assert (
        "rows scanned with the shipped calibration: detection accuracy 1/1; false positives on clean models: 0"
        in text
    )
    assert "1 more rows were scanned with an earlier calibration" in text
    assert text.count("| shipped |") == 1 and text.count("| earlier |") == 1

    # a family whose BAN verdict needs its two readings to agree: a row at its cut counts only
    # when it was scanned under that condition (rows recorded before it existed carry no flag)
    conditioned = [f for f, on in cal.get("all_to_one_agreement_by_family", {}).items() if on]
    assert conditioned, "the shipped calibration conditions no family"
    fam = conditioned[0]
    at = {**row, "eps": cal["eps_by_family"][fam], "threshold": cal["all_to_one_thresholds"][fam]}
    rows = [at, {**at, "seed": 2, "all_to_one_agreement": True}]
    (tmp_path / "r.json").write_text(json.dumps({"suite": "full", "rows": rows}))
    text = bench.render(results_dir=tmp_path, out=tmp_path / "RESULTS.md").read_text()
    assert (
        "detection accuracy 1/1;" in text and "1 more rows were scanned with an earlier calibration" in text
    )

    # a backdoor that did not implant (its no-defence row's ASR under 50%) is listed, not counted
    weak = {**row, "model": "w", "attack": "wanet", "truth": "backdoored", "verdict": "backdoored"}
    none = {"suite": "full", "arch": "a", "attack": "wanet", "model": "w", "method": "none", "seed": 0}
    none |= {"acc": 0.88, "asr": 0.05, "ra": 0.8, "der": None, "seconds": 0.0}
    (tmp_path / "w.json").write_text(json.dumps({"suite": "full", "rows": [none, weak]}))
    text = bench.render(results_dir=tmp_path, out=tmp_path / "RESULTS.md").read_text()
    assert "detection accuracy 1/1;" in text
    assert "1 more rows are of backdoors that did not implant (no-defence ASR under 50%)" in text
    assert "| w | backdoored | backdoored |" in text

    # a family with a split cut (a higher all-to-one cut where the readings split): likewise, a row
    # at its cut counts only when it was scanned with that split cut
    split_cal = {**cal, "all_to_one_agreement_by_family": {}, "all_to_one_split_thresholds": {fam: 0.5}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("timm_purify.detection.load_calibration", lambda: split_cal)
        rows = [at, {**at, "seed": 3, "all_to_one_split_threshold": 0.5}]
        (tmp_path / "r.json").write_text(json.dumps({"suite": "full", "rows": rows}))
        text = bench.render(results_dir=tmp_path, out=tmp_path / "RESULTS.md").read_text()
    assert (
        "detection accuracy 1/1;" in text and "1 more rows were scanned with an earlier calibration" in text
    )


def test_the_heldout_section_shows_each_familys_record_and_every_model(bench, monkeypatch, tmp_path):
    """The held-out record per family, marked void where the cuts changed since it was counted,
    and every model of the check's file with its verdict and whether it is right."""
    from timm_purify.detection.ban import family_cuts, family_fit

    record = {
        "false_positives": 1,
        "clean_models": 2,
        "detected": 1,
        "backdoored_models": 2,
        "targets_correct": 1,
        "all_to_one_models": 2,
        "all_to_one_detected": 2,
    }
    model = {"acc": 0.8, "ban_statistics": {"all_to_one": 0.4}, "reach_score": 0.1, "spread_score": None}
    check = {
        "command": "python benchmarks/calibrate_reach.py --check x",
        "families": {
            "batchnorm": {
                "models": [
                    {**model, "model": "m-clean", "attack": None, "mode": None, "target": None, "asr": None}
                    | {"verdict": "backdoored", "reported_target": 8, "right": False},
                    {**model, "model": "m-bad", "attack": "badnets", "mode": "all-to-one", "target": 2}
                    | {"asr": 0.9, "verdict": "backdoored", "reported_target": 2, "right": True},
                ]
            }
        },
        "not_used": [{"model": "m-weak", "acc": 0.7, "asr": 0.3, "reason": "ASR 0.300 < --min-asr 0.5"}],
    }
    (tmp_path / "check.json").write_text(json.dumps(check))
    calibration = {"threshold": 0.3, "all_to_all_threshold": 0.1, "eps_by_family": {"batchnorm": 0.5}}
    entry = {"record": record, "errors": 2, "date": "d", "check_out": str(tmp_path / "check.json")}
    calibration["heldout"] = {
        "what": "w",
        "by_family": {
            "batchnorm": {
                **entry,
                "cuts": family_cuts(calibration, "batchnorm"),
                "fit": family_fit(calibration, "batchnorm"),
            },
            "other": {**entry, "cuts": {"eps": 0.75}, "check_out": None},
        },
    }
    monkeypatch.setattr("timm_purify.detection.load_calibration", lambda: calibration)
    lines = bench._heldout_section()
    assert "| batchnorm | d | 1/2 | 1/2 | 1/2 | 2 | yes |" in lines
    assert "| other | d | 1/2 | 1/2 | 1/2 | 2 | no: the cuts or their fit changed since |" in lines
    assert any("regenerate with `python benchmarks/calibrate_reach.py --check x`" in line for line in lines)
    assert (
        "| m-clean | batchnorm | clean | 80.00 | - | 0.400 | 0.100 | - | backdoored (8) | **no** |" in lines
    )
    assert (
        "| m-bad | batchnorm | badnets all-to-one (target 2) | 80.00 | 90.00 | 0.400 | 0.100 | - | "
        "backdoored (2) | yes |" in lines
    )
    assert any(line.startswith("| m-weak |") and "not used: ASR 0.300" in line for line in lines)
