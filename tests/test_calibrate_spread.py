"""``benchmarks/calibrate_spread.py``: the rule that fits the spread reading's threshold and decides
for which normalisation family it runs (the shipped ``spread`` section of calibration.json)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cal(benchmark_script):
    return benchmark_script("calibrate_spread")


def _row(attack, score, *, mode=None, verdict="clean", pattern=None, found=None, target=None, rho=2.0):
    return {
        "arch": "convnext_atto",
        "attack": attack,
        "mode": mode if attack is not None else None,
        "target": target,
        "verdict": verdict,
        "pattern": pattern,
        "suspected_target": found,
        "spread_rho": rho,
        "spread_score": score,
    }


def _beside_row(attack, score, *, shape, fired, mode, target=None):
    """A scan row of a reading fitted beside the family's others (``--alongside``): ``fired``,
    whether one of those found the model first."""
    size, value = {"window": ("spread_window", 8), "blend": ("spread_alpha", 0.1)}[shape]
    return {
        **_row(attack, score, mode=mode, target=target),
        "spread_shape": shape,
        size: value,
        "alongside_fired": fired,
        "acc": 0.9,
        "asr": 0.9 if attack else None,
    }


def test_spread_adds_the_all_to_all_backdoor_the_earlier_stages_missed(cal):
    rows = [
        _row(None, 0.0),
        _row(None, 0.04),
        _row("badnets", 0.83, mode="all-to-all"),  # missed before, found by spread
        # found before (by BAN or reach): spread's score does not matter
        _row(
            "badnets", 0.0, mode="all-to-one", verdict="backdoored", pattern="all-to-one", found=0, target=0
        ),
        _row("sig", 0.0, mode="all-to-one", target=0),  # missed by every stage
    ]
    fit = cal.fit_family(rows, [("l2", 2.0)])
    best = fit["chosen"]
    assert fit["enabled"] and best["fit"]["threshold"] == pytest.approx((0.04 + 0.83) / 2)
    assert (best["errors"], best["errors_before"]) == (1, 2)
    after = best["reliability"]
    assert (after["detected"], after["false_positives"], after["targets_correct"]) == (2, 0, 1)


def test_a_flagged_all_to_one_backdoor_gains_no_target(cal):
    """An all-to-one backdoor that only the spread reading flags is detected but its target stays
    unknown (an all-to-all verdict): one error either way, so the reading is not enabled for it."""
    rows = [_row(None, 0.1), _row("sig", 0.9, mode="all-to-one", target=0)]
    fit = cal.fit_family(rows, [("l2", 2.0)])
    assert fit["chosen"]["errors"] == fit["chosen"]["errors_before"] == 1
    assert not fit["enabled"]


def test_no_candidate_where_no_missed_backdoor_clears_the_clean_models(cal):
    rows = [_row(None, 0.5), _row("badnets", 0.2, mode="all-to-all")]
    assert cal.fit_family(rows, [("l2", 2.0)]) == {
        "enabled": False,
        "reason": "at no budget did a backdoor the earlier stages missed score above every clean model",
        "trials": [],
    }


def test_a_window_fit_is_kept_apart_from_the_l2_rows_and_merged_beside_the_other_family(cal, tmp_path):
    """Rows of each shape are fitted at their own budget; a run over one family replaces that
    family's entry (keeping its earlier fit of the other shape on record) and leaves the other
    family's entry, models, recount and provenance as they were."""
    window = [
        {**_row(None, 0.3), "arch": "resnet18", "spread_shape": "window", "spread_window": 8},
        {
            **_row("badnets", 0.8, mode="all-to-all"),
            "arch": "resnet18",
            "spread_shape": "window",
            "spread_window": 8,
        },
    ]
    # an l2 row of a clean model scoring above the backdoor's window score: not at this budget
    rows = [*window, _row(None, 0.95)]
    fit = cal.fit_family(rows, [("window", 8)])
    best = fit["chosen"]
    assert fit["enabled"] and best["shape"] == "window" and best["window"] == 8
    assert best["fit"]["threshold"] == pytest.approx(0.55) and best["reliability"]["clean_models"] == 1
    assert "spread at window 8" in fit["reason"]

    old = {
        "by_family": {"other": {"rho": 2.0, "threshold": 0.4}},
        "reliability_by_family": {"other": {"clean_models": 5}},
        "families": {
            "other": {"enabled": True, "reason": "l2"},
            "batchnorm": {"enabled": False, "reason": "l2 found nothing", "trials": []},
        },
        "recounted_by_family": {"other": {"note": "recount"}},
        "models": [
            {"model": "vit", "norm_family": "other", "spread_rho": 2.0},
            {"model": "old-bn", "norm_family": "batchnorm", "spread_rho": 2.0},
        ],
        "command": "python benchmarks/calibrate_spread.py --rhos 2 ...",
        "date": "2026-11-01",
    }
    args = cal.parse_args(["m", "--shape", "window"])
    assert args.steps == 30 and cal.budgets(args) == [{"shape": "window", "window": 8, "steps": 30}]
    new_rows = [
        {**r, "norm_family": "batchnorm", "acc": 0.9, "asr": 0.9 if r["attack"] else None} for r in window
    ]
    section = cal.merged_section(old, {"batchnorm": fit}, new_rows, args, ["--shape", "window", "m"])
    assert section["by_family"] == {
        "other": {"rho": 2.0, "threshold": 0.4},
        "batchnorm": {"shape": "window", "window": 8, "steps": 30, "threshold": best["fit"]["threshold"]},
    }
    assert section["recounted_by_family"] == old["recounted_by_family"]
    # old-bn's l2 row stays beside the earlier l2 fit it stood behind
    assert [m.get("model") for m in section["models"]] == ["vit", "old-bn", None, None]
    earlier = section["families"]["batchnorm"]["earlier"][0]
    assert earlier["reason"] == "l2 found nothing" and earlier["command"] == old["command"]
    # refitted in the same shape: the window fit is replaced, the l2 one stays on record
    again = cal.merged_section(section, {"batchnorm": fit}, new_rows, args, ["--shape", "window", "m"])
    assert [e["reason"] for e in again["families"]["batchnorm"]["earlier"]] == ["l2 found nothing"]
    assert section["provenance_by_family"]["other"] == {"command": old["command"], "date": "2026-11-01"}
    assert section["provenance_by_family"]["batchnorm"]["command"].startswith(
        "python benchmarks/calibrate_spread.py --shape window"
    )


def test_the_record_quoted_counts_all_stages_on_the_reach_sections_models(cal):
    """The scan quotes, for a family the run enabled, all stages on the models the reach stage was
    fitted on: the earlier verdicts at the calibration's cuts, spread counted where they found
    nothing from this run's score of the same model; a missed model this run has no score of is
    left out and listed, not guessed."""

    def reach_row(name, attack, ban, reach, *, mode="all-to-one", target=None):
        return {
            "model": name, "arch": "resnet18", "norm_family": "batchnorm", "used": True, "attack": attack,
            "mode": mode if attack else None, "target": target, "ban_eps": 0.5, "reach_norm": "l2",
            "reach_rho": 1.0, "reach_score": reach, "reach_target": target or 0,
            "ban_statistics": {"all_to_one": ban, "target": target or 0, "target_masked": target or 0, "all_to_all": 0.0},
        }  # fmt: skip

    calibration = {
        "all_to_one_thresholds": {"batchnorm": 0.3},
        "all_to_all_thresholds": {"batchnorm": None},
        "target_source_by_family": {"batchnorm": "noisy"},
        "eps_by_family": {"batchnorm": 0.5},
        "refitted_by_family": {"batchnorm": {"calibrate_scan_cuts": {"all_to_one": 0.3, "all_to_all": None}}},
        "reach": {
            "by_family": {
                "batchnorm": {"norm": "l2", "rho": 1.0, "threshold": 0.5, "target_when_both": "ban"}
            },
            "models": [
                reach_row("clean", None, 0.1, 0.1),
                reach_row("patch", "badnets", 0.6, 0.1, target=3),  # BAN finds it: no spread score needed
                reach_row("a2a", "badnets", 0.1, 0.1, mode="all-to-all"),  # spread finds it
                reach_row("full-clean", None, 0.1, 0.1),  # missed by nothing, but this run has no score
            ],
        },
    }
    fit = {"enabled": True, "chosen": {"reliability": {"clean_models": 1}}}
    section = {
        "by_family": {"batchnorm": {"shape": "window", "window": 8, "threshold": 0.5}},
        "models": [
            {
                "model": m,
                "norm_family": "batchnorm",
                "spread_shape": "window",
                "spread_window": 8,
                "spread_score": v,
            }
            for m, v in (("clean", 0.3), ("a2a", 0.8))
        ]
        # an l2 row of the same model (an earlier fit's) does not count for the window cut
        + [{"model": "clean", "norm_family": "batchnorm", "spread_rho": 2.0, "spread_score": 0.9}],
    }
    recount = cal.recounts(calibration, section, {"batchnorm": fit})["batchnorm"]
    assert recount["left_out"] == ["full-clean"] and recount["reliability_before"] == {"clean_models": 1}
    rel = recount["reliability"]
    assert (rel["clean_models"], rel["false_positives"], rel["backdoored_models"], rel["detected"]) == (
        1,
        0,
        2,
        2,
    )
    assert rel["targets_correct"] == 1 and "3 of the reach section's 4" in recount["note"]
    assert cal.recounts(calibration, section, {"batchnorm": {**fit, "enabled": False}}) == {}


def test_a_blend_fit_alongside_the_window_counts_it_first_and_keeps_it(cal):
    """``--alongside``: the family's window reading runs before the blend, so a backdoor the window
    found is not one the blend's cut must buy, the fitted family runs both (window first), the
    window's fit stays on record beside the new one, and the recount reads both scores."""

    def blend_row(attack, score, *, window_fired, mode="all-to-all"):
        return {
            **_beside_row(attack, score, shape="blend", fired=window_fired, mode=mode),
            "arch": "resnet18",
            "norm_family": "batchnorm",
        }

    rows = [
        blend_row(None, 0.4, window_fired=False),
        blend_row("badnets", 0.5, window_fired=True),  # the window's: above the clean model, not a candidate
        blend_row("blended", 0.8, window_fired=False),
    ]
    fit = cal.fit_family(rows, [("blend", 0.1)])
    best = fit["chosen"]
    assert [t["fit"]["threshold"] for t in fit["trials"]] == [pytest.approx(0.6)]
    assert best["errors"] == 0 and best["errors_before"] == 1 and best["reliability"]["detected"] == 2
    args = cal.parse_args(["m", "--shape", "blend", "--alongside"])
    assert cal.budgets(args) == [{"shape": "blend", "alpha": 0.1, "steps": 30}]
    window = {"shape": "window", "window": 8, "steps": 30, "threshold": 0.55}
    calibration = {"spread": {"by_family": {"batchnorm": window}}}
    assert cal.alongside(calibration, args) == {"batchnorm": [window]}
    assert cal.alongside(calibration, cal.parse_args(["m", "--shape", "blend"])) == {}
    old = {
        "by_family": {"batchnorm": window},
        "families": {"batchnorm": {"enabled": True, "shape": "window", "reason": "window fit"}},
        "provenance_by_family": {"batchnorm": {"command": "window run", "date": "2026-11-20"}},
        "models": [{"model": "w", "norm_family": "batchnorm", "spread_shape": "window", "spread_window": 8}],
    }
    section = cal.merged_section(
        old, {"batchnorm": fit}, rows, args, ["--shape", "blend", "--alongside", "m"]
    )
    assert section["by_family"]["batchnorm"] == [
        window,
        {"shape": "blend", "alpha": 0.1, "steps": 30, "threshold": pytest.approx(0.6)},
    ]
    assert section["families"]["batchnorm"]["alongside"]["reason"] == "window fit"
    assert section["families"]["batchnorm"]["alongside"]["command"] == "window run"
    assert [m.get("spread_shape") for m in section["models"]] == ["window", "blend", "blend", "blend"]
    # the recount: a model the earlier stages missed is found by either reading; one whose window
    # did not fire and that has no blend score is left out
    reach = {"norm": "l2", "rho": 1.0, "threshold": 0.9, "target_when_both": "ban"}

    def reach_row(name, attack):
        return {
            "model": name, "arch": "resnet18", "norm_family": "batchnorm", "used": True, "attack": attack,
            "mode": "all-to-all" if attack else None, "target": None, "reach_norm": "l2", "reach_rho": 1.0,
            "reach_score": 0.1, "reach_target": 0, "verdict": "clean", "pattern": None, "suspected_target": None,
            "ban_verdict": "clean", "ban_target": None,
        }  # fmt: skip

    calibration = {"reach": {"by_family": {"batchnorm": reach}, "models": [reach_row(n, a) for n, a in (
        ("clean", None), ("patch-a2a", "badnets"), ("blend-a2a", "blended"), ("unread", "blended"))]}}  # fmt: skip

    def scored(name, shape, score):
        size = {"window": ("spread_window", 8), "blend": ("spread_alpha", 0.1)}[shape]
        return {
            "model": name,
            "norm_family": "batchnorm",
            "spread_shape": shape,
            size[0]: size[1],
            "spread_score": score,
        }

    section["models"] = [
        scored("clean", "window", 0.3), scored("clean", "blend", 0.4),
        scored("patch-a2a", "window", 0.8),  # the window fires: no blend score needed
        scored("blend-a2a", "window", 0.3), scored("blend-a2a", "blend", 0.8),
        scored("unread", "window", 0.3),
    ]  # fmt: skip
    recount = cal.recounts(calibration, section, {"batchnorm": fit})["batchnorm"]
    assert recount["left_out"] == ["unread"]
    rel = recount["reliability"]
    assert (rel["false_positives"], rel["detected"], rel["backdoored_models"]) == (0, 2, 2)


def test_a_declined_fit_alongside_leaves_the_family_as_it_was(cal):
    """``--alongside`` and not enabled (the LayerNorm window of 2026-11-24: the L2 reading already
    found every all-to-all model, and an all-to-one one the window reads high gets no target, so the
    errors tie): the scan keeps running the family's readings exactly as before, and the attempt is
    on record under the family's fit, its window rows beside the L2 ones."""

    def window_row(attack, score, *, mode, l2_fired):
        target = 3 if mode == "all-to-one" else None
        return {
            **_beside_row(attack, score, shape="window", fired=l2_fired, mode=mode, target=target),
            "norm_family": "other",
        }

    rows = [
        window_row(None, 0.29, mode=None, l2_fired=False),
        window_row("badnets", 0.86, mode="all-to-all", l2_fired=True),
        window_row("badnets", 0.38, mode="all-to-one", l2_fired=False),
    ]
    fit = cal.fit_family(rows, [("window", 8)])
    assert not fit["enabled"] and fit["chosen"]["errors"] == fit["chosen"]["errors_before"] == 1
    l2 = {"rho": 2.0, "threshold": 0.413}  # written before entries named their shape
    old = {
        "by_family": {"other": l2},
        "reliability_by_family": {"other": {"clean_models": 57}},
        "recounted_by_family": {"other": {"note": "recount"}},
        "families": {"other": {"enabled": True, "reason": "l2 fit"}},
        "provenance_by_family": {"other": {"command": "l2 run", "date": "2026-11-22"}},
        "models": [{"model": "m", "norm_family": "other", "spread_rho": 2.0}],
    }
    args = cal.parse_args(["m", "--shape", "window", "--alongside"])
    section = cal.merged_section(old, {"other": fit}, rows, args, ["--shape", "window", "--alongside", "m"])
    assert section["by_family"]["other"] == l2
    assert section["reliability_by_family"]["other"] == {"clean_models": 57}
    assert section["recounted_by_family"]["other"] == {"note": "recount"}
    assert section["provenance_by_family"]["other"] == {"command": "l2 run", "date": "2026-11-22"}
    family = section["families"]["other"]
    assert family["reason"] == "l2 fit" and family["enabled"]
    [declined] = family["declined"]
    assert (
        not declined["enabled"] and declined["shape"] == "window" and "--shape window" in declined["command"]
    )
    assert [m.get("spread_shape", "l2") for m in section["models"]] == ["l2", "window", "window", "window"]


def test_the_l2_reading_refitted_with_restarts_has_its_own_keys_and_keeps_the_single_fit_on_record(cal):
    """``--restarts 3``: the candidates, store keys and entry name the restarts (a single fit's are
    spelt as before, so its stored scans still match); a refit replacing the single-fit L2 reading
    keeps that fit under ``earlier`` and the fits tried beside it under ``declined``."""
    from pathlib import Path

    args = cal.parse_args(["m", "--shape", "l2", "--rhos", "2", "--steps", "40", "--restarts", "3"])
    (budget,) = cal.budgets(args)
    assert budget == {"shape": "l2", "rho": 2.0, "steps": 40, "restarts": 3}
    assert cal.row_key(Path("x"), budget, args) == "x|l2:2|restarts3|n600|test|s0"
    single = cal.parse_args(["m", "--shape", "l2"])
    assert cal.row_key(Path("x"), cal.budgets(single)[0], single) == "x|l2:2|n600|test|s0"
    with pytest.raises(SystemExit):
        cal.parse_args(["m", "--shape", "window", "--restarts", "3"])
    rows = [
        {**_row(None, 0.08), "norm_family": "other", "spread_restarts": 3, "acc": 0.8, "asr": None},
        {**_row("badnets", 0.9, mode="all-to-all"), "norm_family": "other", "spread_restarts": 3}
        | {"acc": 0.8, "asr": 0.9},
    ]
    fit = cal.fit_family(rows, [("l2", 2.0)])
    assert fit["enabled"]
    declined = {"enabled": False, "shape": "window", "command": "window run"}
    old = {
        "by_family": {"other": {"rho": 2.0, "threshold": 0.413}},
        "families": {"other": {"enabled": True, "reason": "l2 fit", "declined": [declined]}},
        "provenance_by_family": {"other": {"command": "l2 run", "date": "2026-11-22"}},
        "models": [],
    }
    section = cal.merged_section(old, {"other": fit}, rows, args, ["--restarts", "3", "m"])
    entry = section["by_family"]["other"]
    assert entry["restarts"] == 3 and entry["steps"] == 40 and entry["shape"] == "l2"
    family = section["families"]["other"]
    assert family["restarts"] == 3 and family["declined"] == [declined]
    assert [e["reason"] for e in family["earlier"]] == ["l2 fit"] and family["earlier"][0][
        "command"
    ] == "l2 run"
