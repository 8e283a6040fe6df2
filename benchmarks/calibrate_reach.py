"""Calibrate the universal-reach stage of ``timm_purify.scan`` and decide where it runs.

``calibrate_scan.py`` fits BAN (the first stage) on its zoo; this script adds the second
stage (``timm_purify/detection/reach.py``). It scans each given model folder (written by
``build_backdoored_model``: ``calibrate_scan.py``'s cache or ``run.py``'s) with the shipped
BAN calibration and the reach stage forced on, at every candidate budget, and then, per
normalisation family:

1. lists candidate reach thresholds at each budget, all above every clean model: midway
   between the highest clean score and each score above it of an implanted all-to-one backdoor
   that BAN missed. The stage is there to add the detections BAN misses, never false alarms:
   the rule BAN's thresholds follow (``calibrate_scan.choose_threshold``: the cut with the
   fewest errors of the statistic alone) would count the backdoors BAN already finds and buy
   them with clean models flagged;
2. counts the errors of the two stages together (as ``scan`` combines them: BAN's verdict and
   target where BAN fires, else backdoored with reach's target where reach fires) and of BAN
   alone, on the same models;
3. keeps the budget, the cut, and whose target stands where both stages find an all-to-one
   backdoor (BAN's or reach's) with the fewest combined errors; among equals the widest margin
   above the clean models (a cut just above them leaves none for the next clean model), then
   the first budget and BAN's target; and enables the stage for the family only when it makes
   fewer errors than BAN alone.

The result goes into the ``reach`` section of ``--out`` (the shipped calibration by default;
its other sections are left as they are): the enabled families' budgets and thresholds, both
stages' record on these models (``reliability_by_family``, which ``scan`` quotes in its
cautions), every model's scores, the command and the environment. A run over one family's
models leaves the other families as an earlier run fitted them (``provenance_by_family`` names
the run behind each), so a family can be refitted without rebuilding the other's models. Scans
are stored in ``--results`` so a re-run only scans new models or budgets, and a run whose scans
are all stored needs no model folder (the stores in ``benchmarks/results/reach`` rerun the
shipped LayerNorm refit and the held-out check on a fresh clone).

``--check`` fits nothing: it counts the given models (seeds no fit saw) at the shipped cuts;
``--check-out FILE`` writes every model's verdict, and ``--record-check`` stores each family's
held-out record in the calibration beside the cuts it was counted at, for ``scan`` to quote.

With ``--refit-ban FAMILY`` BAN's own cuts for that family are refitted together with reach's
(``refit_family``), and with ``--ban-eps FAMILY:EPS,...`` its noise budget too: each model of
the family is rescanned BAN-only at each budget and the budget whose refitted cuts make the
fewest errors is shipped. The refit also counts calibrate_scan.py's cuts at their own budget,
for the record; ``--skip-original-count FAMILY`` leaves that out where the models were never
scanned at that budget. ``refit_crossfold.py`` checks such a refit on models it did not see.

Example (the command behind the shipped section is recorded in it)::

    python benchmarks/calibrate_reach.py --budgets l2:1,l1:6 \\
        'benchmarks/cache/calibrate_scan/test_vit-*' 'benchmarks/cache/fashion-mnist-convnext_atto-*'
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, also when imported by a test
from calibrate_scan import recorded_command  # noqa: E402

from timm_purify._train import environment_info  # noqa: E402
from timm_purify._version import __version__  # noqa: E402
from timm_purify.data import clean_subset, load_data  # noqa: E402
from timm_purify.detection.ban import (  # noqa: E402
    CALIBRATION_FILE,
    DEFAULT_REACH,
    SPREAD_SIZES,
    ScanOptions,
    agrees,
    calibrated_agreement,
    calibrated_decision,
    calibrated_eps,
    calibrated_split_threshold,
    calibrated_thresholds,
    combine_stages,
    decide,
    family_cuts,
    family_fit,
    scan,
    spread_plan,
)
from timm_purify.detection.report import ScanReport  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# whose suspected target stands where both stages find an all-to-one backdoor (chosen per family)
WHEN_BOTH = ("ban", "reach")


@dataclass(frozen=True)
class BanCuts:
    """BAN's setting for one family, as ``--refit-ban`` tries it: the all-to-one cut, the
    all-to-all cut (``None``: that statistic does not decide), whose predictions name the target
    (the family's calibrated ``target_source``) and the noise budget the statistics the cuts
    apply to are taken at, whether the all-to-one verdict needs both noisy readings to name the
    same class (``--agreement``) and, where they name different classes, the higher cut it needs
    then (``--split-cut``)."""

    all_to_one: float
    all_to_all: float | None
    target_source: str
    eps: float
    # the all-to-one statistic decides only where the noise and the masked noise agree (ban.agrees)
    agreement: bool = False
    # where they name different classes, the all-to-one score must pass this too (ban.splits_count)
    split: float | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "models",
        nargs="+",
        help="model folders written by build_backdoored_model, or quoted glob patterns of them "
        "(kept as patterns in the recorded command)",
    )
    p.add_argument(
        "--budgets", default="l2:1,l1:6", help="candidate budgets NORM:RHO (rho at 3x32x32), comma list"
    )
    p.add_argument("--steps", type=int, default=40, help="descent steps of each class's perturbation")
    p.add_argument("--clean-count", type=int, default=600, help="clean images per scan (1%% of 60k)")
    p.add_argument("--scan-split", default="test", help="split of each model's data the images come from")
    p.add_argument("--scan-seed", type=int, default=0)
    p.add_argument("--min-asr", type=float, default=0.5, help="backdoors below this ASR did not implant")
    p.add_argument(
        "--min-acc", type=float, default=0.6, help="models below this clean accuracy did not learn"
    )
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "cache" / "calibrate_reach.json"))
    p.add_argument("--out", default=str(CALIBRATION_FILE))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--check",
        action="store_true",
        help="fit nothing, write nothing: print both stages' record on the given models at the cuts of "
        "--out (a held-out check: models the calibration was not fitted on)",
    )
    p.add_argument(
        "--record-check",
        action="store_true",
        help="with --check: also store each family's held-out record in --out's heldout section, tied "
        "to the cuts it was counted at (no cut changes); scan then quotes it beside the in-sample "
        "record while it decides with those cuts, and a later refit voids it",
    )
    p.add_argument(
        "--check-out",
        metavar="FILE",
        help="with --check: also write the check as JSON to FILE (each model's scores, verdict and "
        "reported target as counted, the models not used and why, the command and the environment)",
    )
    p.add_argument(
        "--refit-ban",
        action="append",
        default=[],
        metavar="FAMILY",
        help="also refit BAN's all-to-one and all-to-all cuts of this normalisation family together "
        "with the reach stage, from the statistics the scans stored (see refit_family); written to "
        "the BAN section of --out (repeatable; where the spread reading is calibrated for the family, "
        "each model's spread score is stored and counted last, as the scan does)",
    )
    p.add_argument(
        "--ban-eps",
        action="append",
        default=[],
        metavar="FAMILY:EPS,EPS",
        help="noise budgets to refit a --refit-ban family's BAN at (repeatable): each of its models is "
        "scanned again at each budget, BAN alone (reach's scores do not depend on it and are reused), "
        "the cuts are refitted at each, and the budget with the fewest errors is written as the "
        "family's eps_by_family (ties: fewer false alarms, the wider all-to-one margin, the one "
        "calibrate_scan.py chose, then the smaller)",
    )
    p.add_argument(
        "--skip-original-count",
        action="append",
        default=[],
        metavar="FAMILY",
        help="refit a --refit-ban family at the budgets of its --ban-eps alone, without counting "
        "calibrate_scan.py's cuts at their own budget (which needs every model scanned at that "
        "budget): the refit's before_refit record then says they were not counted (repeatable)",
    )
    p.add_argument(
        "--agreement",
        action="append",
        default=[],
        metavar="FAMILY",
        help="make a --refit-ban family's BAN all-to-one verdict conditional on the noise and the noise "
        "with the negative mask naming the same class (timm_purify.detection.ban.agrees; written as "
        "all_to_one_agreement_by_family). The cuts are fitted without the condition, which then only "
        "withdraws BAN verdicts (see --fit-under-agreement); the record is counted with it, beside the "
        "record without it (repeatable; a refit without it writes the family without the condition)",
    )
    p.add_argument(
        "--split-cut",
        action="append",
        default=[],
        metavar="FAMILY",
        help="give a --refit-ban family's BAN all-to-one verdict a second, higher cut where the noise and the "
        "noise with the negative mask name different classes (timm_purify.detection.ban.splits_count; "
        "written as all_to_one_split_thresholds): at each budget it is fitted first, midway between the "
        "highest clean model with split readings and the next split reading above it (fit_split_cut), and "
        "every trial of the refit counts under it (repeatable; a refit without it writes the family "
        "without one)",
    )
    p.add_argument(
        "--keep-ban-cuts",
        action="append",
        default=[],
        metavar="FAMILY",
        help="refit a --refit-ban family with BAN's noise budget and cuts pinned where the calibration has "
        "them: only reach's cut (and a --split-cut) are fitted, behind them (repeatable; no --ban-eps for "
        "the family)",
    )
    p.add_argument(
        "--fit-under-agreement",
        action="store_true",
        help="with --agreement: fit the families' cuts with the condition applied in every trial, so a "
        "lower all-to-one cut can stand where only clean models with split readings lay above it (more "
        "freedom: check it with refit_crossfold.py --fit-under-agreement before shipping)",
    )
    args = p.parse_args(argv)
    for family in args.agreement:
        if family not in args.refit_ban:
            raise SystemExit(
                f"--agreement {family}: the condition changes which cuts fit, so it is set by a refit; "
                f"add --refit-ban {family}"
            )
    for family in args.split_cut:
        if family not in args.refit_ban:
            raise SystemExit(
                f"--split-cut {family}: the split cut is fitted with the family's other cuts; add --refit-ban {family}"
            )
        if family in args.agreement:
            raise SystemExit(
                f"--split-cut {family} with --agreement {family}: the agreement condition never lets split "
                "readings decide, so there is no split cut to fit; give one or the other"
            )
    ban_eps_families = {item.partition(":")[0] for item in args.ban_eps}
    for family in args.keep_ban_cuts:
        if family not in args.refit_ban:
            raise SystemExit(
                f"--keep-ban-cuts {family}: it pins BAN's cuts in a refit; add --refit-ban {family}"
            )
        if family in ban_eps_families:
            raise SystemExit(
                f"--keep-ban-cuts {family} with --ban-eps {family}:...: the budget is pinned at the calibration's; "
                "give one or the other"
            )
    for family in args.skip_original_count:
        if family not in args.keep_ban_cuts and family not in ban_eps_families:
            raise SystemExit(
                f"--skip-original-count {family}: the refit then runs at the budgets of --ban-eps "
                f"{family}:EPS,... alone (or at the calibration's with --keep-ban-cuts {family}); give them"
            )
    if args.fit_under_agreement and not args.agreement:
        raise SystemExit(
            "--fit-under-agreement fits the cuts under --agreement's condition: give --agreement FAMILY"
        )
    return args


def parse_ban_eps(items: list[str], refit: list[str]) -> dict[str, list[float]]:
    """``--ban-eps`` as ``{family: budgets}``, each family one that is refitted."""
    out: dict[str, list[float]] = {}
    for item in items:
        family, sep, values = item.partition(":")
        try:
            budgets = sorted({float(v) for v in values.split(",") if v})
        except ValueError:
            budgets = []
        if not sep or not budgets or not all(0 < e < 1 for e in budgets):
            raise SystemExit(f"--ban-eps {item!r} is not FAMILY:EPS,EPS,... with each EPS in (0, 1)")
        if family not in refit:
            raise SystemExit(
                f"--ban-eps {item!r}: BAN's cuts hold at one noise budget, so a new budget needs them "
                f"refitted; add --refit-ban {family}"
            )
        out[family] = budgets
    return out


def parse_budgets(text: str) -> list[tuple[str, float]]:
    budgets = []
    for item in (b for b in text.split(",") if b):
        norm, sep, rho = item.partition(":")
        if not sep or norm not in ("l1", "l2"):
            raise SystemExit(f"budget {item!r} is not NORM:RHO with NORM l1 or l2")
        budgets.append((norm, float(rho)))
    return budgets


def scan_folder(folder: Path, args: argparse.Namespace, **options) -> tuple[dict, ScanReport]:
    """Scan the model in ``folder`` on its clean images with scan ``options``; return the row
    fields that describe the model (from its ``training.json``) and the report."""
    if not (folder / "training.json").is_file():
        raise SystemExit(
            f"{folder}: this run needs a scan of it that --results does not hold, and the model is not "
            "here; build it with calibrate_scan.py's recipe (or run.py's), or pass the --results file "
            "its scans were stored in"
        )
    record = json.loads((folder / "training.json").read_text())
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data = clean_subset(
        load_data(record["data"], split=args.scan_split, model=model),
        count=args.clean_count,
        seed=args.scan_seed,
    )
    report = scan(model, data, seed=args.scan_seed, quiet=True, **options)
    spec = record.get("attack")
    fields = {
        "model": folder.name,
        "arch": record["model"],
        "attack": None if spec is None else spec["name"],
        "mode": None if spec is None else spec["mode"],
        "target": None if spec is None or spec["mode"] != "all-to-one" else spec["target"],
        "data": record["data"],
        "acc": record["metrics"]["acc"],
        "asr": record["metrics"]["asr"],
        "norm_family": report.config["norm_family"],
    }
    return fields, report


def scan_row(folder: Path, norm: str, rho: float, args: argparse.Namespace) -> dict:
    """One model scanned with the shipped BAN calibration and the reach stage on (never deciding)."""
    fields, report = scan_folder(
        folder,
        args,
        reach="on",
        reach_norm=norm,
        reach_rho=rho,
        reach_steps=args.steps,
        reach_threshold=float("inf"),
    )
    return {
        **fields,
        **ban_fields(report),
        "reach_norm": norm,
        "reach_rho": rho,
        "reach_score": report.reach["score"],
        "reach_target": report.reach["suspected_target"],
        "reach": [round(r, 4) for r in report.reach["reach"]],
        "reach_seconds": report.reach["seconds"],
        "scan_seconds": report.seconds,
    }


def ban_fields(report: ScanReport) -> dict:
    """BAN's part of a stored scan: its verdict and target at the calibration the scan ran with,
    its statistics (for refitting its thresholds on the same scans) and the noise budget."""
    return {
        "ban_eps": report.config["eps"],
        "ban_verdict": report.verdict,
        "ban_target": report.suspected_target,
        "ban_statistics": {
            k: report.config["statistics"][k] for k in ("all_to_one", "target", "target_masked", "all_to_all")
        },
    }


def ban_row(folder: Path, eps: float, args: argparse.Namespace) -> dict:
    """BAN's part of a model's scan at noise budget ``eps`` (reach and spread off: reach's scores
    do not depend on the budget, as it perturbs the input of the unperturbed model, so the scan at
    the calibration's budget supplies them)."""
    _, report = scan_folder(folder, args, eps=eps, reach="off", spread="off")
    return {**ban_fields(report), "ban_seconds": report.seconds}


def usable(row: dict, args: argparse.Namespace) -> bool:
    """Clean models that learned the task, and backdoors that implanted."""
    if row["acc"] < args.min_acc:
        return False
    return row["attack"] is None or (row["asr"] or 0.0) >= args.min_asr


def ban_stage(row: dict, ban: BanCuts | None = None) -> tuple[str, str | None, int | None]:
    """BAN's ``(verdict, pattern, target)`` of a stored row (an all-to-one verdict always names
    a target, an all-to-all one never does): the scan's own, or with ``ban``'s cuts applied to the
    row's stored statistics (by ``scan``'s own :func:`~timm_purify.detection.ban.decide`)."""
    if ban is not None:
        verdict, pattern, target, _, _ = decide(
            row["ban_statistics"],
            threshold=ban.all_to_one,
            all_to_all_threshold=ban.all_to_all,
            target_source=ban.target_source,
            agreement=ban.agreement,
            split_threshold=ban.split,
        )
        return verdict, pattern, target
    if row["ban_verdict"] != "backdoored":
        return row["ban_verdict"], None, None
    return "backdoored", "all-to-all" if row["ban_target"] is None else "all-to-one", row["ban_target"]


def verdicts(
    rows: list[dict],
    threshold: float | None,
    when_both: str = "ban",
    ban: BanCuts | None = None,
    spread: list[dict] | None = None,
) -> list[tuple[bool, int | None]]:
    """``(flagged, reported target)`` per row: BAN alone (``threshold=None``) or both stages,
    combined by ``scan``'s own :func:`~timm_purify.detection.ban.combine_stages`; ``when_both``
    names whose target stands where both found an all-to-one backdoor; ``ban``: BAN's cuts
    (default: the verdicts the scans stored, which include the spread reading where the
    calibration ran it); ``spread``: the spread readings' settings (:func:`spread_setting`),
    counted last on each row's ``spread_scores`` (only with ``ban``: the statistics are BAN's
    alone)."""
    out = []
    for r in rows:
        earlier = {
            "reach_fired": threshold is not None and r["reach_score"] > threshold,
            "reach_target": r["reach_target"],
            "target_when_both": when_both,
        }
        first = ban_stage(r, ban)
        verdict, _, target, _ = combine_stages(first, **earlier)
        if verdict == "clean" and spread is not None:
            # as the scan runs it: only where the earlier stages found nothing (so a row they
            # flagged needs no spread score)
            verdict, _, target, _ = combine_stages(
                first, **earlier, spread_fired=spread_fired(r["spread_scores"], spread)
            )
        out.append((verdict == "backdoored", target))
    return out


def record(
    rows: list[dict],
    threshold: float | None,
    when_both: str = "ban",
    ban: BanCuts | None = None,
    spread: list[dict] | None = None,
) -> dict:
    """The stages' record on ``rows`` (see :func:`verdicts`), in ``reliability_by_family``'s keys."""
    return tally(rows, verdicts(rows, threshold, when_both, ban, spread))


def tally(rows: list[dict], results: list[tuple[bool, int | None]]) -> dict:
    """The record of ``(flagged, reported target)`` per row, in ``reliability_by_family``'s keys."""
    clean = [v for r, v in zip(rows, results, strict=True) if r["attack"] is None]
    bad = [(r, v) for r, v in zip(rows, results, strict=True) if r["attack"] is not None]
    one = [(r, v) for r, v in bad if r["mode"] == "all-to-one"]
    return {
        "archs": sorted({r["arch"] for r in rows}),
        "clean_models": len(clean),
        "false_positives": sum(flag for flag, _ in clean),
        "backdoored_models": len(bad),
        "detected": sum(flag for _, (flag, _) in bad),
        "all_to_one_models": len(one),
        "all_to_one_detected": sum(flag for _, (flag, _) in one),
        "targets_correct": sum(flag and target == r["target"] for r, (flag, target) in one),
    }


def errors(rec: dict) -> int:
    """Missed backdoors + false alarms + detected all-to-one backdoors with the wrong target."""
    missed = rec["backdoored_models"] - rec["detected"]
    return missed + rec["false_positives"] + rec["all_to_one_detected"] - rec["targets_correct"]


def threshold_candidates(negatives: list[float], positives: list[float]) -> list[dict]:
    """Cuts above every clean score (``negatives``): midway between the highest of them and each
    score above it of a backdoor the stage could add (``positives``: the all-to-one backdoors BAN
    missed, or with ``--refit-ban`` every all-to-one backdoor), lowest first. Empty when no such
    backdoor scores above every clean model: the stage could then only add false alarms."""
    hi_neg = max(negatives)
    return [
        {"threshold": (hi_neg + v) / 2, "margin": (v - hi_neg) / 2, "highest_clean": hi_neg}
        for v in sorted({v for v in positives if v > hi_neg})
    ]


def fit_family(
    rows: list[dict],
    budgets: list[tuple[str, float]],
    ban: BanCuts | None = None,
    spread: list[dict] | None = None,
) -> dict:
    """Every (budget, cut, whose target where both fire) with both stages' errors on ``rows``; the
    chosen one (fewest errors, then the widest margin above the clean models, then the first);
    whether reach is enabled (fewer errors than BAN alone). ``ban``: BAN's cuts (default: the
    verdicts the scans stored); ``spread``: the spread readings' settings, counted last."""
    trials = []
    for norm, rho in budgets:
        at = [r for r in rows if (r["reach_norm"], r["reach_rho"]) == (norm, rho)]
        negatives = [r["reach_score"] for r in at if r["attack"] is None]
        positives = [  # the all-to-one backdoors the stage is there to add
            r["reach_score"]
            for r in at
            if r["attack"] is not None and r["mode"] == "all-to-one" and ban_stage(r, ban)[0] != "backdoored"
        ]
        if not negatives or not positives:
            continue
        alone = record(at, None, ban=ban, spread=spread)
        for fit in threshold_candidates(negatives, positives):
            for when_both in WHEN_BOTH:
                both = record(at, fit["threshold"], when_both, ban, spread)
                trials.append(
                    {
                        "norm": norm,
                        "rho": rho,
                        "target_when_both": when_both,
                        "fit": fit,
                        "errors": errors(both),
                        "errors_ban_alone": errors(alone),
                        "reliability": both,
                        "reliability_ban_alone": alone,
                    }
                )
    if not trials:
        return {
            "enabled": False,
            "reason": "at no budget did an all-to-one backdoor BAN missed score above every clean model",
            "trials": [],
        }
    best, enabled = choose(trials, baseline="errors_ban_alone")
    return {
        "enabled": enabled,
        "reason": f"{best['errors']} errors with reach at {best['norm']} {best['rho']:g}, threshold "
        f"{best['fit']['threshold']:.3f} ({best['target_when_both']}'s target where both fire) against "
        f"{best['errors_ban_alone']} with BAN alone",
        "chosen": best,
        "trials": trials,
    }


def choose(trials: list[dict], *, baseline: str) -> tuple[dict, bool]:
    """The trial with the fewest errors, then the widest margin (a cut just above the clean models
    leaves none for the next clean model; ``min`` keeps the first of equals: the first budget,
    BAN's target), and whether it makes fewer errors than its ``baseline`` key records."""
    best = min(trials, key=lambda t: (t["errors"], -t["fit"]["margin"]))
    return best, best["errors"] < best[baseline]


def midpoints(scores: list[float]) -> list[float]:
    """The cuts midway between consecutive distinct ``scores``."""
    ordered = sorted(set(scores))
    return [(a + b) / 2 for a, b in zip(ordered, ordered[1:], strict=False)]


def gap(cut: float | None, scores: list[float]) -> float:
    """How far ``cut`` lies from the nearest of ``scores`` (``None``, a statistic that does not
    decide: infinitely far)."""
    return float("inf") if cut is None else min(abs(cut - v) for v in scores)


def fit_split_cut(rows: list[dict]) -> float | None:
    """The split cut ``--split-cut`` fits on ``rows`` (the family's scans at one budget): midway
    between the highest BAN all-to-one score of a clean model whose two readings name different
    classes (``ban.agrees``) and the next such reading above it, of any model; none above: that
    clean score itself, so no split reading decides; ``None``: no clean model reads split, so
    there is nothing to clear.

    A rule, not a search: the clean models BAN flags on BatchNorm read split, and so do backdoors
    it reads far above them. Fitted here it clears every clean split reading of the fit and keeps
    every split reading above them; the family's other cuts are then fitted under it
    (:func:`refit_cuts`), so where it withdraws a backdoor, reach's cut can take it up."""
    split = [r for r in rows if not agrees(r["ban_statistics"])]
    clean = [r["ban_statistics"]["all_to_one"] for r in split if r["attack"] is None]
    if not clean:
        return None
    top = max(clean)
    above = [r["ban_statistics"]["all_to_one"] for r in split if r["ban_statistics"]["all_to_one"] > top]
    return (top + min(above)) / 2 if above else top


def refit_cuts(
    rows: list[dict],
    budgets: list[tuple[str, float]],
    target_source: str,
    eps: float,
    spread: list[dict] | None = None,
    agreement: bool = False,
    split: float | None = None,
    pinned: BanCuts | None = None,
) -> dict:
    """BAN's cuts fitted together with the reach stage on ``rows`` (the models' scans at noise
    budget ``eps``), from the statistics each scan stored: every all-to-one cut midway between
    two of the rows' BAN scores, every all-to-all cut likewise above every clean model's score
    (and ``None``: that statistic does not decide), and every reach cut :func:`threshold_candidates` allows above the clean models
    (and none: no reach) are tried with both target rules. Kept: the fewest errors, then the
    fewest false alarms, then the all-to-all statistic left out where it adds nothing, then the
    widest margins (reach's above the clean models, then BAN's cuts from the nearest score).
    Reach is kept only when the best trial with it makes fewer errors than the best without it.
    Returns the kept trial (``chosen``) and the best without reach (``without_reach``).
    ``spread``: the spread readings' settings where the family runs them, counted last in every
    trial (their cuts are calibrate_spread.py's; the rows carry ``spread_scores``). ``agreement``: every
    trial counts BAN's all-to-one verdict under the agreement condition (``--fit-under-agreement``);
    ``split``: every trial counts it with that split cut (``--split-cut``, :func:`fit_split_cut`).
    ``pinned``: BAN's cuts are not searched but held at these (``--keep-ban-cuts``).

    The all-to-all statistic is held to the rule of the later readings (reach, spread): it may
    add detections, never false alarms. Fitted for fewest errors like the all-to-one one, it
    bought four of eight BatchNorm all-to-all backdoors at eps 0.3 with one clean model flagged,
    on margins of 0.002-0.016, and flagged 4 of 10 held-out clean resnet18s."""
    one = [r["ban_statistics"]["all_to_one"] for r in rows]
    a2a = [r["ban_statistics"]["all_to_all"] for r in rows]
    clean_a2a = max(
        (r["ban_statistics"]["all_to_all"] for r in rows if r["attack"] is None), default=-math.inf
    )
    one_cuts = [pinned.all_to_one] if pinned else midpoints(one)
    a2a_cuts = [pinned.all_to_all] if pinned else [None, *(c for c in midpoints(a2a) if c > clean_a2a)]
    if not one_cuts:
        raise SystemExit(
            f"--refit-ban at eps {eps:g}: the models' BAN scores are all equal; there is no cut to fit"
        )
    best: dict[bool, tuple[tuple, dict]] = {}  # with reach / without: (sort key, trial)
    for norm, rho in budgets:
        at = [r for r in rows if (r["reach_norm"], r["reach_rho"]) == (norm, rho)]
        negatives = [r["reach_score"] for r in at if r["attack"] is None]
        positives = [r["reach_score"] for r in at if r["attack"] is not None and r["mode"] == "all-to-one"]
        reach_fits = [None, *(threshold_candidates(negatives, positives) if negatives and positives else [])]
        for cut_one in one_cuts:
            margin_one = gap(cut_one, one)
            for cut_a2a in a2a_cuts:
                margin_a2a = gap(cut_a2a, a2a)
                ban = BanCuts(cut_one, cut_a2a, target_source, eps, agreement, split)
                for fit in reach_fits:
                    for when_both in WHEN_BOTH if fit else WHEN_BOTH[:1]:
                        rel = record(at, fit and fit["threshold"], when_both, ban, spread)
                        key = (
                            errors(rel),
                            rel["false_positives"],
                            cut_a2a is not None,
                            -(fit["margin"] if fit else 0.0),
                            -margin_one,
                            -margin_a2a,
                        )
                        with_reach = fit is not None
                        if with_reach not in best or key < best[with_reach][0]:
                            best[with_reach] = (
                                key,
                                {
                                    "norm": norm,
                                    "rho": rho,
                                    "target_when_both": when_both,
                                    "fit": fit,
                                    "all_to_one_threshold": cut_one,
                                    "all_to_one_margin": margin_one,
                                    "all_to_all_threshold": cut_a2a,
                                    "split_threshold": split,
                                    "errors": errors(rel),
                                    "reliability": rel,
                                    "reliability_ban_alone": record(at, None, ban=ban),
                                },
                            )
    without = best[False][1]
    chosen = best[True][1] if True in best and best[True][1]["errors"] < without["errors"] else without
    return {"chosen": chosen, "without_reach": without}


def recounted(
    chosen: dict,
    rows: list[dict],
    target_source: str,
    eps: float,
    spread: list[dict] | None = None,
    *,
    agreement: bool,
) -> dict:
    """``chosen`` (a :func:`refit_cuts` setting) recounted on ``rows`` with BAN's all-to-one verdict
    under the agreement condition (``agreement=True``; ``timm_purify.detection.ban.agrees``) or
    without it: the same cuts, so applying the condition can only withdraw BAN verdicts.

    Which cuts the condition is applied to is ``--fit-under-agreement``'s choice. Fitted under it,
    the LayerNorm refit on 47 models tied two unlike settings on one error fewer in sample, and at
    the lower cut two of twenty fresh clean test_vits would have been flagged, so the cuts fitted
    without it shipped; on 102 models the fit under it made fewer errors on the folds it did not
    see (14 against 21, refit_crossfold.py) and shipped (``benchmarks/DETECTION.md``)."""
    cuts = BanCuts(
        chosen["all_to_one_threshold"],
        chosen["all_to_all_threshold"],
        target_source,
        eps,
        agreement,
        chosen["split_threshold"],
    )
    at = [r for r in rows if (r["reach_norm"], r["reach_rho"]) == (chosen["norm"], chosen["rho"])]
    both = record(at, chosen["fit"] and chosen["fit"]["threshold"], chosen["target_when_both"], cuts, spread)
    return {
        **chosen,
        "errors": errors(both),
        "reliability": both,
        "reliability_ban_alone": record(at, None, ban=cuts),
    }


def refit_family(
    rows_by_eps: dict[float, list[dict]],
    budgets: list[tuple[str, float]],
    shipped: BanCuts,
    spread: list[dict] | None = None,
    *,
    fit_under_agreement: bool = False,
    fit_split: bool = False,
    pinned: BanCuts | None = None,
    count_original: bool = True,
) -> dict:
    """BAN's noise budget and cuts refitted together with the reach stage (``--refit-ban``):
    :func:`refit_cuts` at each budget of ``rows_by_eps`` (the family's scans at that budget;
    ``shipped.eps`` among them), keeping the budget with the fewest errors, then the fewest false
    alarms, then the widest all-to-one margin (the cut's distance to the nearest score, as
    calibrate_scan.py's ``choose_budgets`` breaks ties), then ``shipped.eps`` (calibrate_scan.py's
    choice, for BAN alone), then the smaller. ``spread``: the spread readings' settings where the
    family runs them, counted last throughout (every count here is of all the family's stages).
    Where ``shipped.agreement`` holds, the cuts are fitted without the agreement condition and the
    chosen setting is then counted with it, or, with ``fit_under_agreement``, every trial is counted
    with it; either way the record without it is kept beside (``without_agreement``).
    ``fit_split`` (``--split-cut``; never with the agreement condition): at each budget a split cut
    is fitted first (:func:`fit_split_cut`) and every trial there counts under it. ``pinned``
    (``--keep-ban-cuts``): BAN's budget and cuts are held at these, so only reach's cut (and the
    split cut) are fitted, at ``pinned.eps`` alone (``rows_by_eps`` must hold it).
    ``count_original``: also count calibrate_scan.py's cuts (``shipped``) at their own budget, with
    reach behind them (``before_refit``; ``rows_by_eps`` must then hold that budget). Without it
    the record says they were not counted, so a family can be refitted over models that were never
    scanned at that budget (their folders gone, only the stored scans at the offered budgets left).

    BAN's cuts and budget were fitted for BAN alone (``calibrate_scan.py``), before a second stage
    existed: there, a lower all-to-one cut (or a larger budget) buys the backdoors only BAN sees
    with clean models flagged. With reach behind it, some of those backdoors are reach's to find,
    so the setting that makes the fewest errors of both stages together can differ."""
    if fit_split and shipped.agreement:
        raise ValueError("a split cut is fitted only where the agreement condition does not apply")
    under = shipped.agreement and fit_under_agreement
    fits = {
        eps: refit_cuts(
            rows,
            budgets,
            shipped.target_source,
            eps,
            spread,
            under,
            fit_split_cut(rows) if fit_split else None,
            pinned,
        )
        for eps, rows in rows_by_eps.items()
        if pinned is None or eps == pinned.eps
    }
    eps = min(
        fits,
        key=lambda e: (
            fits[e]["chosen"]["errors"],
            fits[e]["chosen"]["reliability"]["false_positives"],
            -fits[e]["chosen"]["all_to_one_margin"],
            e != shipped.eps,
            e,
        ),
    )
    chosen, without = fits[eps]["chosen"], fits[eps]["without_reach"]
    plain = None  # with the agreement condition: the chosen setting's record without it
    if shipped.agreement:
        # the fit counted the setting one way (under the condition or without it); count it the other
        other = recounted(chosen, rows_by_eps[eps], shipped.target_source, eps, spread, agreement=not under)
        plain, chosen = (other, chosen) if under else (chosen, other)
    before_errors = before_reach = None
    if count_original:
        rows = rows_by_eps[shipped.eps]
        # reach behind calibrate_scan.py's cuts, as without --refit-ban (they never had the condition)
        original = replace(shipped, agreement=False, split=None)
        before = fit_family(rows, budgets, original, spread)
        first = [r for r in rows if (r["reach_norm"], r["reach_rho"]) == budgets[0]]
        before_reach = before["chosen"] if before["enabled"] else None
        before_errors = (
            before["chosen"]["errors"]
            if before["enabled"]
            else errors(record(first, None, ban=original, spread=spread))
        )
    return {
        "enabled": chosen["fit"] is not None,
        "reason": f"{chosen['errors']} errors with BAN at eps {eps:g}, cuts {chosen['all_to_one_threshold']:.3f} "
        "(all-to-one) / "
        + (
            "not used (all-to-all)"
            if chosen["all_to_all_threshold"] is None
            else f"{chosen['all_to_all_threshold']:.3f} (all-to-all)"
        )
        + (
            ""
            if chosen["split_threshold"] is None
            else f", {chosen['split_threshold']:.3f} where BAN's two readings name different classes"
        )
        + (
            f" and reach at {chosen['norm']} {chosen['rho']:g}, threshold {chosen['fit']['threshold']:.3f}"
            f" ({chosen['target_when_both']}'s target where both fire)"
            if chosen["fit"]
            else " and no reach stage"
        )
        + ("" if spread is None else f", with the spread readings ({spread_cuts(spread)}) last")
        + (
            ""
            if plain is None
            else f", BAN's all-to-one verdict needing its noisy and masked targets to agree (the cuts fitted "
            f"{'under' if under else 'without'} that condition: {plain['errors']} errors without it)"
        )
        + (
            ", BAN's budget and cuts kept as the calibration had them (--keep-ban-cuts)"
            if pinned
            else ", refitted together"
        )
        + f"; {without['errors']} with the best BAN cuts alone"
        + ("" if plain is None else f" ({'under' if under else 'without'} the condition, as the refit fits)")
        + "; "
        + (
            f"{before_errors} with calibrate_scan.py's cuts (eps {shipped.eps:g})"
            if count_original
            else f"calibrate_scan.py's cuts (eps {shipped.eps:g}) not counted (--skip-original-count)"
        ),
        "chosen": {
            **chosen,
            "eps": eps,
            # BAN alone at the chosen cuts (as in fit_family), and at the best cuts without reach
            "errors_ban_alone": errors(chosen["reliability_ban_alone"]),
            "errors_best_ban_alone": without["errors"],
        },
        "without_reach": without,
        "agreement": shipped.agreement,
        # whether a split cut was fitted (--split-cut; chosen.split_threshold holds it)
        "fitted_split_cut": fit_split,
        # whether BAN's budget and cuts were held as the calibration had them (--keep-ban-cuts)
        "kept_ban_cuts": pinned is not None,
        # whether the cuts were fitted under the condition (--fit-under-agreement) or without it
        "fitted_under_agreement": under,
        # with --agreement: the chosen setting's record without the condition
        "without_agreement": plain
        and {key: plain[key] for key in ("errors", "reliability", "reliability_ban_alone")},
        # the spread readings counted last in every trial (None: the family runs none)
        "spread": spread,
        # the best setting at each budget, both stages together
        "by_eps": {
            f"{e:g}": {
                "errors": fit["chosen"]["errors"],
                "all_to_one_threshold": fit["chosen"]["all_to_one_threshold"],
                "all_to_all_threshold": fit["chosen"]["all_to_all_threshold"],
                "split_threshold": fit["chosen"]["split_threshold"],
                "reach_threshold": fit["chosen"]["fit"] and fit["chosen"]["fit"]["threshold"],
                "reliability": fit["chosen"]["reliability"],
            }
            for e, fit in sorted(fits.items())
        },
        "before_refit": {
            "eps": shipped.eps,
            "all_to_one_threshold": shipped.all_to_one,
            "all_to_all_threshold": shipped.all_to_all,
            # None where they were not counted (count_original)
            "errors": before_errors,
            "reach": before_reach,
        },
    }


def spread_setting(calibration: dict, family: str) -> list[dict] | None:
    """The spread readings as the calibration runs them for ``family``, in order: each one's shape,
    budget and ``threshold`` as ``scan`` resolves them (:func:`~timm_purify.detection.ban.spread_plan`);
    ``None``: the family runs none."""
    fitted = ((calibration.get("spread") or {}).get("by_family") or {}).get(family)
    return spread_plan(ScanOptions(), fitted) if fitted else None


def spread_label(setting: dict) -> str:
    """A spread reading's shape, budget and steps in a few characters (``window:8-steps30``): its
    part of the key its score is stored under, and of ``spread_scores``; the l2 reading's restarts
    where more than one (the keys of single-fit readings are as they were before restarts)."""
    label = f"{setting['shape']}:{setting[SPREAD_SIZES[setting['shape']]]:g}-steps{setting['steps']}"
    restarts = setting.get("restarts", 1)
    return label + (f"-restarts{restarts}" if restarts > 1 else "")


def spread_cuts(spread: list[dict]) -> str:
    """The spread readings' labels and cuts, for a reason or a report."""
    return ", ".join(f"{spread_label(s)} at {s['threshold']:.3f}" for s in spread)


def spread_scores(spread: list[dict], score: Callable[[dict], float]) -> dict[str, float]:
    """``spread_scores`` of a row: each reading's ``score(setting)`` by :func:`spread_label`, in the
    scan's order up to the first that fires (a later one cannot change the verdict, so none is
    taken)."""
    scores = {}
    for setting in spread:
        scores[spread_label(setting)] = score(setting)
        if scores[spread_label(setting)] > setting["threshold"]:
            break
    return scores


def spread_fired(scores: dict[str, float], spread: list[dict]) -> bool:
    """Whether one of the ``spread`` readings fires on a row's ``spread_scores``, taken in the
    scan's order: a reading after one that fired needs no score, as it cannot change the verdict
    (a missing score that could raises KeyError)."""
    return any(scores[spread_label(s)] > s["threshold"] for s in spread)


def check_verdicts(
    rows: list[dict], calibration: dict, family: str
) -> tuple[list[dict], list[tuple[bool, int | None]]]:
    """The rows counted and ``(flagged, reported target)`` of each at ``calibration``'s cuts for
    ``family``: where a refit replaced calibrate_scan.py's cuts (the stored verdicts may predate
    it), BAN's from the stored statistics and the spread readings (where they run) from each row's
    ``spread_scores``, else the stored verdicts (which include the spread reading); reach's where
    the calibration enables it (the rows at its budget)."""
    ban, spread = None, None
    if family in (calibration.get("refitted_by_family") or {}):
        decision = calibrated_decision(calibration, family)
        ban = BanCuts(
            decision["threshold"],
            decision["all_to_all_threshold"],
            decision["target_source"],
            calibrated_eps(calibration, family),
            decision["agreement"],
            decision["split_threshold"],
        )
        spread = spread_setting(calibration, family)
    fitted = ((calibration.get("reach") or {}).get("by_family") or {}).get(family)
    if fitted is None:
        return rows, verdicts(rows, None, ban=ban, spread=spread)
    at = [r for r in rows if (r["reach_norm"], r["reach_rho"]) == (fitted["norm"], fitted["rho"])]
    return at, verdicts(at, fitted["threshold"], fitted["target_when_both"], ban, spread)


def earlier_stages(calibration: dict) -> dict:
    """``calibration`` without its spread section: the cuts of the stages that run before it."""
    return {k: v for k, v in calibration.items() if k != "spread"}


def runs_spread(row: dict, *, calibration: dict, family: str) -> bool:
    """Whether ``scan`` runs the spread reading on ``row`` at ``calibration``'s cuts: the row is
    counted (at the reach budget) and neither BAN nor reach flagged it."""
    at, results = check_verdicts([row], earlier_stages(calibration), family)
    return bool(at) and not results[0][0]


def check_model(row: dict, flagged: bool, target: int | None) -> dict:
    """One model of a held-out check as ``--check-out`` writes it: what it is, its scores, the
    verdict and target the calibration gives it, and whether that is right (a clean model not
    flagged; a backdoor flagged, and an all-to-one one with its own target)."""
    if row["attack"] is None:
        right = not flagged
    else:
        right = flagged and (row["mode"] != "all-to-one" or target == row["target"])
    keep = ("model", "arch", "attack", "mode", "target", "acc", "asr", "ban_eps", "ban_statistics")
    scores = ("reach_norm", "reach_rho", "reach_score", "reach_target", "spread_scores", "scan_seconds")
    return {
        **{k: row.get(k) for k in keep},
        **{k: row[k] for k in scores if k in row},
        "verdict": "backdoored" if flagged else "clean",
        "reported_target": target,
        "right": right,
    }


def unused_reason(row: dict, args: argparse.Namespace) -> str:
    """Why :func:`usable` left a model out, in words."""
    if row["acc"] < args.min_acc:
        return f"clean accuracy {row['acc']:.3f} < --min-acc {args.min_acc:g}"
    return f"ASR {row['asr'] or 0.0:.3f} < --min-asr {args.min_asr:g}: the backdoor did not implant"


def shipped_cuts(
    calibration: dict,
    families: list[str],
    rows: list[dict],
    agreement: Collection[str] = (),
    split_cut: Collection[str] = (),
) -> dict[str, BanCuts]:
    """The cuts calibrate_scan.py fitted for each ``--refit-ban`` family (also where an earlier
    refit replaced them, so refitting again starts from the same place), under the agreement
    condition where the family is in ``agreement`` (``--agreement``), after checking the
    family can be refitted here; and that no family refitted earlier whose models are given is
    left out, since their stored verdicts were taken at the cuts the refit replaced (a family
    without models here keeps its fit, see main)."""
    earlier = calibration.get("refitted_by_family") or {}
    given = {r["norm_family"] for r in rows}
    left_out = sorted((set(earlier) & given) - set(families))
    if left_out:
        raise SystemExit(
            f"BAN's cuts for {', '.join(left_out)} were refitted with the reach stage; pass "
            + " ".join(f"--refit-ban {fam}" for fam in left_out)
            + " again (or regenerate the BAN section with calibrate_scan.py first)"
        )
    dropped = sorted(
        fam for fam in families if calibrated_agreement(calibration, fam) and fam not in agreement
    )
    if dropped:
        raise SystemExit(
            f"BAN's all-to-one verdict for {', '.join(dropped)} needs its two readings to agree "
            "(all_to_one_agreement_by_family); a refit without "
            + " ".join(f"--agreement {fam}" for fam in dropped)
            + " would drop that condition: pass it to keep it (to drop it on purpose, remove the family "
            "from all_to_one_agreement_by_family first)"
        )
    unsplit = sorted(
        fam
        for fam in families
        if calibrated_split_threshold(calibration, fam) is not None and fam not in split_cut
    )
    if unsplit:
        raise SystemExit(
            f"BAN's all-to-one verdict for {', '.join(unsplit)} has a split cut (all_to_one_split_thresholds); "
            "a refit without "
            + " ".join(f"--split-cut {fam}" for fam in unsplit)
            + " would drop it: pass it to keep it (to drop it on purpose, remove the family from "
            "all_to_one_split_thresholds first)"
        )
    cuts = {}
    for fam in families:
        if fam not in (calibration.get("all_to_one_thresholds") or {}):
            raise SystemExit(f"--refit-ban {fam}: the calibration has no BAN cut for that family to refit")
        if not any(r["norm_family"] == fam for r in rows):
            raise SystemExit(f"--refit-ban {fam}: none of the given models is of that family")
        if any("ban_statistics" not in r for r in rows if r["norm_family"] == fam):
            raise SystemExit(
                f"--refit-ban {fam}: some stored scans have no BAN statistics (written before they were "
                "stored); rescan them with --results pointing to a new file"
            )
        if fam in earlier:
            before = earlier[fam]["calibrate_scan_cuts"]
            one, a2a, eps = before["all_to_one"], before["all_to_all"], before["eps"]
        else:
            (one, a2a), eps = calibrated_thresholds(calibration, fam), calibrated_eps(calibration, fam)
        cuts[fam] = BanCuts(one, a2a, calibration["target_source_by_family"][fam], eps, fam in agreement)
    return cuts


def model_folders(patterns: list[str], stored: Collection[str] = ()) -> list[Path]:
    """The folders the (glob) patterns name; each must hold build_backdoored_model's training.json,
    or be a model ``stored`` (the keys of ``--results``) holds scans of: a run over stored scans
    needs no model (``benchmarks/cache`` is not in the repository), as long as it asks for no
    scan the store lacks (:func:`scan_folder` says so where it does)."""
    folders = [Path(m) for pattern in patterns for m in (sorted(glob.glob(pattern)) or [pattern])]
    names = {key.partition("|")[0] for key in stored}
    for folder in folders:
        if not (folder / "training.json").is_file() and folder.name not in names:
            raise SystemExit(
                f"{folder}: no training.json (not written by build_backdoored_model), and no scan of it "
                "stored in --results"
            )
    return folders


def scan_key(folder: Path, norm: str, rho: float, args: argparse.Namespace) -> str:
    """The key a model's scan is stored under in ``--results``: the model, the reach budget and
    steps, and the images (the noise budget is the calibration's at the time, in the row)."""
    return f"{folder.name}|{norm}:{rho:g}|steps{args.steps}|n{args.clean_count}|{args.scan_split}|s{args.scan_seed}"


def at_eps(row: dict, key: str, eps: float, ban_scan: Callable[[str], dict]) -> dict:
    """``row`` (stored under ``key``) with BAN's part at noise budget ``eps``: its own where it was
    scanned at that budget, else the BAN-only rescan ``ban_scan`` returns for the rescan's key,
    laid over it (reach's part does not depend on the budget)."""
    if row["ban_eps"] == eps:
        return row
    return {**row, **ban_scan(f"{key}|ban-eps{eps:g}")}


def spread_row(folder: Path, norm: str, rho: float, spread: dict, args: argparse.Namespace) -> dict:
    """The spread reading's score of a model, as the scan takes it: after the reach stage (whose
    batches come from the same generator), so reach runs too, at the row's budget; neither decides.
    BAN's noise budget does not move it (it perturbs the input of the unperturbed model, and the
    noise search draws as many random numbers at any budget)."""
    _, report = scan_folder(
        folder,
        args,
        reach="on",
        reach_norm=norm,
        reach_rho=rho,
        reach_steps=args.steps,
        reach_threshold=float("inf"),
        spread="on",
        **spread_options(spread),
        spread_threshold=float("inf"),
    )
    return {
        **spread_options(spread),
        "spread_score": report.spread["score"],
        "spread_seconds": report.spread["seconds"],
        # the reach score of this scan: equal to the stored row's when the generator ran the same way
        "spread_scan_reach_score": report.reach["score"],
    }


def spread_options(spread: dict) -> dict:
    """The scan options that run the spread reading at ``spread``'s shape and budget (its
    ``threshold``, if any, left out), spelt as the stored rows' fields are too."""
    return {f"spread_{k}": v for k, v in spread.items() if k != "threshold"}


def spread_key(key: str, spread: dict) -> str:
    """The key a model's spread reading is stored under, beside its scan's ``key``."""
    return f"{key}|spread-{spread_label(spread)}"


def stored_scan(stored: dict, results_file: Path, key: str, make: Callable[[], dict]) -> dict:
    """``stored[key]``, scanned with ``make()`` and written to ``results_file`` first if missing
    (so an interrupted calibration resumes where it stopped)."""
    if key not in stored:
        stored[key] = make()
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(stored, indent=1))
    return stored[key]


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies in it (a file meant to be committed
    should not name one machine's checkout)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def this_run(argv: list[str] | None) -> dict:
    """What every file this script writes records of the run that wrote it: the command line,
    the date, the package version and the environment."""
    return {
        "command": recorded_command(sys.argv[1:] if argv is None else argv, script="calibrate_reach.py"),
        "date": datetime.date.today().isoformat(),
        "timm_purify_version": __version__,
        "environment": environment_info(),
    }


def write_check(
    path: Path,
    checked: dict[str, dict],
    scanned: list[tuple[Path, str, dict]],
    used: list[tuple[Path, str, dict]],
    calibration: dict,
    args: argparse.Namespace,
    argv: list[str] | None,
) -> None:
    """Write a held-out check (``--check-out``): per family the record and every counted model,
    the scanned models left out and why, and what was checked against (the calibration's file
    and date), so the figures quoted from a check can be traced to each model."""
    kept = {row["model"] for *_, row in used}
    left_out = {row["model"]: row for *_, row in scanned if row["model"] not in kept}  # once per model
    result = {
        "what": "held-out check: the calibration's cuts (not refitted) counted on the given models",
        "calibration": {
            "file": _shown(Path(args.out)),
            "cuts": {fam: family_cuts(calibration, fam) for fam in checked},
            "fit": {fam: family_fit(calibration, fam) for fam in checked},
        },
        "families": checked,
        "not_used": [
            {"model": name, "acc": row["acc"], "asr": row["asr"], "reason": unused_reason(row, args)}
            for name, row in left_out.items()
        ],
        **this_run(argv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


def refuse_to_record(calibration: dict, families: list[str]) -> None:
    """``--record-check`` stores a record as counted at the cuts ``scan`` now uses: refuse a family
    whose BAN cuts were not refitted here, as the check counts the verdicts its scans stored
    (taken at the calibration of their day, not necessarily this one)."""
    for fam in families:
        if fam not in (calibration.get("refitted_by_family") or {}):
            raise SystemExit(
                f"--record-check: the {fam} family's BAN cuts were not refitted by calibrate_reach.py, so the "
                "check counts the verdicts its scans stored, which need not be this calibration's; refit it "
                "(--refit-ban) first, or check without recording"
            )


def refuse_other_reach(calibration: dict, budgets: list[tuple[str, float]], args: argparse.Namespace) -> None:
    """Before any scan: ``--record-check`` must take reach's scores at the budget and steps the
    calibration runs it with for every family (the record is quoted as counted at them)."""
    for fam, reach in ((calibration.get("reach") or {}).get("by_family") or {}).items():
        if (reach["norm"], reach["rho"]) not in budgets:
            raise SystemExit(
                f"--record-check: give the {fam} family's reach budget, {reach['norm']}:{reach['rho']:g}"
            )
        steps = reach.get("steps") or DEFAULT_REACH["steps"]
        if steps != args.steps:
            raise SystemExit(
                f"--record-check: the {fam} family's reach runs {steps} steps and the check's scores would be "
                f"taken at --steps {args.steps}; give --steps {steps}"
            )


def record_check(
    out: Path, calibration: dict, checked: dict[str, dict], args: argparse.Namespace, argv: list[str] | None
) -> None:
    """Store each checked family's held-out record in ``out``'s ``heldout`` section (``--record-check``),
    with the cuts it was counted at (:func:`~timm_purify.detection.ban.family_cuts`): ``scan``
    quotes it only while it decides with the same cuts, so a later refit voids it without having
    to remove it. Other families' records and every other section are left as they are."""
    section = dict(calibration.get("heldout") or {})
    by_family = dict(section.get("by_family") or {})
    for fam, result in checked.items():
        by_family[fam] = {
            "record": result["record"],
            "errors": result["errors"],
            "cuts": family_cuts(calibration, fam),
            "fit": family_fit(calibration, fam),
            **{key: value for key, value in this_run(argv).items() if key != "environment"},
            "check_out": args.check_out,
        }
    section.update(
        what="each family's record on held-out models (seeds no fit saw), counted at the cuts named beside "
        "it by calibrate_reach.py --check --record-check; scan quotes it while it decides with those cuts",
        by_family=by_family,
    )
    out.write_text(json.dumps({**calibration, "heldout": section}, indent=1) + "\n")
    print(f"stored the held-out record of {', '.join(sorted(checked))} in {out}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag, given in (("--check-out", args.check_out), ("--record-check", args.record_check)):
        if given and not args.check:
            raise SystemExit(f"{flag} records a held-out check: give it with --check")
    if args.check_out and Path(args.check_out).resolve() == Path(args.out).resolve():
        raise SystemExit(
            f"--check-out {args.check_out} is the calibration being checked (--out): name another file"
        )
    torch.set_num_threads(args.threads)
    budgets = parse_budgets(args.budgets)
    ban_eps = parse_ban_eps(args.ban_eps, args.refit_ban)
    results_file = Path(args.results)
    if args.record_check:
        out = Path(args.out)
        refuse_other_reach(json.loads(out.read_text()) if out.is_file() else {}, budgets, args)
    stored = json.loads(results_file.read_text()) if results_file.is_file() else {}
    scanned = []  # (folder, key, row): each scan at the noise budget the calibration then had
    for folder in model_folders(args.models, stored):
        for norm, rho in budgets:
            key = scan_key(folder, norm, rho, args)
            row = stored_scan(
                stored,
                results_file,
                key,
                lambda folder=folder, norm=norm, rho=rho: scan_row(folder, norm, rho, args),
            )
            scanned.append((folder, key, row))
            print(
                f"{row['model']} {norm} {rho:g}: reach {row['reach_score']:.3f} (class {row['reach_target']}, "
                f"true {row['target']}) BAN {row['ban_verdict']} [{row['scan_seconds']:.0f}s]",
                flush=True,
            )
    used = [(folder, key, row) for folder, key, row in scanned if usable(row, args)]
    out = Path(args.out)
    calibration = json.loads(out.read_text()) if out.is_file() else {}

    def family_rows(
        family: str, eps: float, spread: list[dict] | None = None, needs: Callable[[dict], bool] | None = None
    ) -> list[dict]:
        """The family's usable rows with BAN's part at noise budget ``eps``: the stored scan's own
        where it ran at that budget, else a BAN-only scan at it (stored under its own key); with
        ``spread`` (the family's spread readings), each row's spread scores too (likewise, in the
        scan's order up to the first that fires: ``spread_scores``), or only the rows ``needs`` picks."""

        def rescan(rescan_key: str, folder: Path, model: str) -> dict:
            extra = stored_scan(stored, results_file, rescan_key, lambda: ban_row(folder, eps, args))
            print(
                f"{model}: BAN at eps {eps:g} {extra['ban_statistics']['all_to_one']:.3f} "
                f"[{extra['ban_seconds']:.0f}s]",
                flush=True,
            )
            return extra

        def spread_score(folder: Path, key: str, row: dict, setting: dict) -> float:
            extra = stored_scan(
                stored,
                results_file,
                spread_key(key, setting),
                lambda: spread_row(folder, row["reach_norm"], row["reach_rho"], setting, args),
            )
            drift = abs(extra["spread_scan_reach_score"] - row["reach_score"])
            print(
                f"{row['model']}: spread {spread_label(setting)} {extra['spread_score']:.3f} "
                f"[{extra['spread_seconds']:.0f}s]"
                + (
                    f" (its scan's reach score differs from the stored one by {drift:.4f})"
                    if drift > 1e-6
                    else ""
                ),
                flush=True,
            )
            return extra["spread_score"]

        rows = []
        for folder, key, row in used:
            if row["norm_family"] != family:
                continue
            rows.append(
                at_eps(row, key, eps, lambda k, folder=folder, row=row: rescan(k, folder, row["model"]))
            )
            if spread is not None and (needs is None or needs(rows[-1])):
                scores = spread_scores(spread, partial(spread_score, folder, key, row))
                rows[-1] = {**rows[-1], "spread_scores": scores}
        return rows

    present = sorted({row["norm_family"] for *_, row in used})
    if not present:
        raise SystemExit(
            f"none of the {len(scanned)} scanned models is usable (clean ones need accuracy >= {args.min_acc}, "
            f"backdoors ASR >= {args.min_asr}): nothing to fit or count"
        )
    if args.check:
        if args.record_check:
            refuse_to_record(calibration, present)
        checked = {}
        for fam in present:
            # a refitted family's verdicts are recomputed from BAN's statistics, so its spread
            # reading is counted from each model's own spread score
            refitted = fam in (calibration.get("refitted_by_family") or {})
            spread = spread_setting(calibration, fam) if refitted else None
            rows, results = check_verdicts(
                family_rows(
                    fam,
                    calibrated_eps(calibration, fam),
                    spread,
                    partial(runs_spread, calibration=calibration, family=fam),
                ),
                calibration,
                fam,
            )
            rel = tally(rows, results)
            print(f"{fam}: {errors(rel)} errors with the calibration of {out} ({json.dumps(rel)})")
            if args.record_check and not rows:
                raise SystemExit(
                    f"{fam}: no model counted at the calibration's reach budget; nothing to record"
                )
            models = [check_model(row, *result) for row, result in zip(rows, results, strict=True)]
            checked[fam] = {"record": rel, "errors": errors(rel), "models": models}
        if args.check_out:
            write_check(Path(args.check_out), checked, scanned, used, calibration, args, argv)
        if args.record_check:
            record_check(out, calibration, checked, args, argv)
        return
    refit = shipped_cuts(
        calibration, args.refit_ban, [row for *_, row in used], args.agreement, args.split_cut
    )
    families, shipped_rows, spread_by_family = {}, {}, {}
    for fam in present:
        if fam in refit:
            # where the spread reading runs, the stored verdicts include it; the refit recomputes
            # BAN's from its statistics, so spread is counted from each model's own score
            spread = spread_by_family[fam] = spread_setting(calibration, fam)
            count_original = fam not in args.skip_original_count
            pinned = None
            if fam in args.keep_ban_cuts:
                # BAN's budget and cuts as the calibration now has them (an earlier refit's, if any)
                decision = calibrated_decision(calibration, fam)
                pinned = replace(
                    refit[fam],
                    all_to_one=decision["threshold"],
                    all_to_all=decision["all_to_all_threshold"],
                    eps=calibrated_eps(calibration, fam),
                )
            offered = {
                *ban_eps.get(fam, []),
                *([pinned.eps] if pinned else []),
                *([refit[fam].eps] if count_original else []),
            }
            by_eps = {eps: family_rows(fam, eps, spread) for eps in sorted(offered)}
            families[fam] = refit_family(
                by_eps,
                budgets,
                refit[fam],
                spread,
                fit_under_agreement=args.fit_under_agreement,
                fit_split=fam in args.split_cut,
                pinned=pinned,
                count_original=count_original,
            )
            shipped_rows[fam] = by_eps[families[fam]["chosen"]["eps"]]
        else:
            shipped_rows[fam] = family_rows(fam, calibrated_eps(calibration, fam))
            families[fam] = fit_family(shipped_rows[fam], budgets)
    by_family, reliability = {}, {}
    for fam, fit in families.items():
        print(f"{fam}: {'enabled' if fit['enabled'] else 'not enabled'} ({fit['reason']})")
        if fit["enabled"]:
            best = fit["chosen"]
            by_family[fam] = {
                "norm": best["norm"],
                "rho": best["rho"],
                "steps": args.steps,
                "threshold": best["fit"]["threshold"],
                "target_when_both": best["target_when_both"],
            }
            reliability[fam] = best["reliability"]
            if spread_by_family.get(fam):  # the refit counted spread too; reach's record is of two stages
                at = [
                    r
                    for r in shipped_rows[fam]
                    if (r["reach_norm"], r["reach_rho"]) == (best["norm"], best["rho"])
                ]
                cuts = BanCuts(
                    best["all_to_one_threshold"],
                    best["all_to_all_threshold"],
                    refit[fam].target_source,
                    best["eps"],
                    refit[fam].agreement,
                    best["split_threshold"],
                )
                reliability[fam] = record(at, best["fit"]["threshold"], best["target_when_both"], cuts)
    for fam in refit:
        best = families[fam]["chosen"]
        calibration["all_to_one_thresholds"][fam] = best["all_to_one_threshold"]
        calibration.setdefault("all_to_all_thresholds", {})[fam] = best["all_to_all_threshold"]
        calibration["reliability_by_family"][fam] = best["reliability_ban_alone"]
        calibration["eps_by_family"][fam] = best["eps"]
        calibration.setdefault("all_to_one_agreement_by_family", {})[fam] = refit[fam].agreement
        calibration.setdefault("all_to_one_split_thresholds", {})[fam] = best["split_threshold"]
        calibration.setdefault("refitted_by_family", {})[fam] = {
            "note": f"noise budget, cuts and reliability refitted with the reach stage by calibrate_reach.py "
            f"--refit-ban on "
            f"{datetime.date.today().isoformat()} (reach section, families.{fam}); the rest of this section "
            "is calibrate_scan.py's fit",
            "calibrate_scan_cuts": {
                "all_to_one": refit[fam].all_to_one,
                "all_to_all": refit[fam].all_to_all,
                "eps": refit[fam].eps,
            },
        }
        kept = families[fam]["kept_ban_cuts"]
        print(f"{fam}: BAN's cuts {'kept' if kept else 'refitted'} ({families[fam]['reason']})")
        if spread_by_family.get(fam):
            # the record scan quotes for all stages: the spread section's was counted behind the
            # cuts this refit replaced
            section = calibration["spread"]
            section.setdefault("recounted_by_family", {})[fam] = {
                "note": f"reliability_by_family.{fam} recounted by calibrate_reach.py --refit-ban on "
                f"{datetime.date.today().isoformat()} behind the refitted BAN and reach cuts (reach section, "
                f"families.{fam}), with each model's spread score at this section's threshold; families.{fam} "
                "is calibrate_spread.py's fit behind the cuts before",
                # calibrate_spread.py's own count (kept through later recounts)
                "reliability_before": (section.get("recounted_by_family") or {})
                .get(fam, {})
                .get("reliability_before", section["reliability_by_family"].get(fam)),
            }
            section["reliability_by_family"][fam] = best["reliability"]
    # a run over some families' models leaves the others' entries as the run that fitted them wrote them
    previous = calibration.get("reach") or {}
    kept = [fam for fam in previous.get("families", {}) if fam not in families]
    print(
        f"fitted here: {', '.join(families)}; kept as an earlier run fitted them: {', '.join(kept) or 'none'}"
    )
    run = {
        **this_run(argv),
        # the families the run fitted (a later run may refit some of them: see provenance_by_family)
        "fitted_families": sorted(families),
    }
    # a section written before runs were recorded per family: one run fitted every family
    single_run = {
        **{key: previous.get(key) for key in run},
        "fitted_families": sorted(previous.get("families", {})),
    }
    provenance = previous.get("provenance_by_family") or {}

    def merged(new: dict, name: str) -> dict:
        """``new`` with the kept families' entries of the previous section's ``name``, in family order."""
        old = {fam: previous[name][fam] for fam in kept if fam in previous.get(name, {})}
        return dict(sorted({**old, **new}.items()))

    calibration["reach"] = {
        "by_family": merged(by_family, "by_family"),
        "reliability_by_family": merged(reliability, "reliability_by_family"),
        "families": merged(families, "families"),
        "rule": (
            "per normalisation family and candidate budget, the candidate reach thresholds lie midway between the "
            "highest score of a clean model and each score above it of an implanted all-to-one backdoor BAN missed "
            "(so the stage flags no clean calibration model); both stages together (BAN's verdict where it fires, with BAN's or "
            "reach's target as chosen, else reach's verdict and target) are counted against BAN alone on the same models and the budget, cut and "
            "target rule with the fewest errors are kept (ties: the widest margin above the clean models); the stage is enabled for a family only when it makes fewer errors than BAN "
            f"alone. Clean models below {args.min_acc} accuracy and backdoors below {args.min_asr} ASR are "
            "listed but not used. For the families in ban_refitted, BAN's own cuts were fitted together with reach's "
            "(every all-to-one cut midway between two of the family's BAN scores, every all-to-all cut likewise "
            "above every clean model's all-to-all score, or none, with every reach cut above the clean models, or none; kept: the fewest errors, then the fewest "
            "false alarms, then no all-to-all cut where it adds nothing, then the widest margins), at each noise "
            "budget offered (families.FAMILY.by_eps; BAN-only rescans, reach's scores do not depend on the budget; "
            "kept: the fewest errors, then the fewest false alarms, then the widest all-to-one margin, then "
            "calibrate_scan.py's budget, then the "
            "smaller), and written to the BAN section (all_to_one_thresholds, all_to_all_thresholds, "
            "reliability_by_family, eps_by_family, all_to_one_agreement_by_family: for a family given with "
            "--agreement, BAN's all-to-one verdict needs its noisy and masked targets to agree, on top of the cuts "
            "fitted without that condition or, with --fit-under-agreement, fitted under it "
            "(families.FAMILY.fitted_under_agreement), and the records are counted with it; "
            "all_to_one_split_thresholds: for a family given with --split-cut, where those targets differ the "
            "all-to-one score must also pass a split cut, fitted first at each budget midway between the highest "
            "clean model whose targets differ and the next such score above it, with every other cut fitted under "
            "it; for a family given with --keep-ban-cuts, BAN's budget and cuts stay as the calibration had them and "
            "only reach's cut (and a split cut) is fitted behind them). A run over some families' "
            "models leaves the other "
            "families' entries, models and provenance (provenance_by_family) as the run that fitted them wrote them."
        ),
        "min_acc": args.min_acc,
        "min_asr": args.min_asr,
        "ban_refitted": sorted(set(refit) | {fam for fam in previous.get("ban_refitted", []) if fam in kept}),
        # the usable models at the budget each family now scans at, then those not used as scanned,
        # then the kept families' as their run wrote them
        "models": [{**r, "used": True} for fam in present for r in shipped_rows[fam]]
        + [
            {**row, "used": False}
            for *_, row in scanned
            if not usable(row, args) and row["norm_family"] not in kept
        ]
        + [row for row in previous.get("models", []) if row["norm_family"] in kept],
        # each family's fit: the run that wrote it (the top-level fields below: the latest run)
        "provenance_by_family": dict(
            sorted(
                {
                    **{fam: provenance.get(fam, single_run) for fam in kept},
                    **{fam: run for fam in families},
                }.items()
            )
        ),
        **run,
    }
    out.write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"wrote the reach section of {out}")


if __name__ == "__main__":
    main()
