"""Calibrate the universal-spread reading of ``timm_purify.scan`` (its all-to-all stage).

``calibrate_scan.py`` fits BAN, ``calibrate_reach.py`` the per-class reach; this script fits the
last reading (``universal_spread`` in ``timm_purify/detection/reach.py``): one untargeted
universal perturbation, scored by how many classes it moves, each elsewhere. It scans each
given model folder (written by ``build_backdoored_model``) with the shipped calibration (BAN,
and reach where enabled) and the spread reading forced on at every candidate budget, then,
per normalisation family, follows ``calibrate_reach.py``'s rule:

1. candidate thresholds above every clean model: midway between the highest clean score and
   each score above it of an implanted backdoor the earlier stages missed (the reading is
   there to add detections, never false alarms);
2. the errors of all stages together (as ``scan`` combines them, ``combine_stages``: the
   earlier verdict where it fired, else an all-to-all verdict where spread fires) against the
   earlier stages alone, on the same models;
3. the budget and cut with the fewest errors (ties: the widest margin above the clean models,
   then the first budget); enabled for a family only with fewer errors than without it.

The result goes into the ``spread`` section of ``--out`` (the shipped calibration by default;
other sections are left as they are). Scans are stored in ``--results``.

Example (the command behind the shipped section is recorded in it)::

    python benchmarks/calibrate_spread.py --rhos 2 'benchmarks/cache/calibrate_scan/*' \\
        'benchmarks/cache/fashion-mnist-*'
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also when imported by a test
from calibrate_reach import (  # noqa: E402
    choose,
    errors,
    model_folders,
    scan_folder,
    stored_scan,
    tally,
    threshold_candidates,
    usable,
)
from calibrate_scan import recorded_command  # noqa: E402

from timm_purify._train import environment_info  # noqa: E402
from timm_purify._version import __version__  # noqa: E402
from timm_purify.detection.ban import CALIBRATION_FILE, combine_stages  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "models",
        nargs="+",
        help="model folders written by build_backdoored_model, or quoted glob patterns of them",
    )
    p.add_argument("--rhos", default="2", help="candidate L2 budgets at 3x32x32, comma list")
    p.add_argument(
        "--steps", type=int, default=40, help="ascent steps of the perturbation (stored results: 40)"
    )
    p.add_argument("--clean-count", type=int, default=600, help="clean images per scan (1%% of 60k)")
    p.add_argument("--scan-split", default="test", help="split of each model's data the images come from")
    p.add_argument("--scan-seed", type=int, default=0)
    p.add_argument("--min-asr", type=float, default=0.5, help="backdoors below this ASR did not implant")
    p.add_argument(
        "--min-acc", type=float, default=0.6, help="models below this clean accuracy did not learn"
    )
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "cache" / "calibrate_spread.json"))
    p.add_argument("--out", default=str(CALIBRATION_FILE))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def scan_row(folder: Path, rho: float, args: argparse.Namespace) -> dict:
    """One model scanned with the shipped calibration and the spread reading on (never deciding)."""
    fields, report = scan_folder(
        folder, args, spread="on", spread_rho=rho, spread_steps=args.steps, spread_threshold=float("inf")
    )
    return {
        **fields,
        # the earlier stages' verdict (BAN, and reach where the shipped calibration enables it)
        "verdict": report.verdict,
        "pattern": report.pattern,
        "suspected_target": report.suspected_target,
        "decided_by": report.config["decided_by"],
        "spread_rho": rho,
        "spread_score": report.spread["score"],
        "spread_top_destination": report.spread["top_destination"],
        "spread_moved": [round(v, 4) for v in report.spread["moved"]],
        "spread_seconds": report.spread["seconds"],
        "scan_seconds": report.seconds,
    }


def record(rows: list[dict], threshold: float | None) -> dict:
    """All stages' record on ``rows`` (``threshold=None``: the earlier stages alone)."""
    results = []
    for r in rows:
        verdict, _, target, _ = combine_stages(
            (r["verdict"], r["pattern"], r["suspected_target"]),
            reach_fired=False,  # reach's part is already in the stored verdict
            reach_target=None,
            spread_fired=threshold is not None and r["spread_score"] > threshold,
        )
        results.append((verdict == "backdoored", target))
    return tally(rows, results)


def fit_family(rows: list[dict], rhos: list[float]) -> dict:
    """Every (budget, cut) with all stages' errors on ``rows``; the chosen one; whether enabled."""
    trials = []
    for rho in rhos:
        at = [r for r in rows if r["spread_rho"] == rho]
        negatives = [r["spread_score"] for r in at if r["attack"] is None]
        positives = [
            r["spread_score"] for r in at if r["attack"] is not None and r["verdict"] != "backdoored"
        ]
        if not negatives or not positives:
            continue
        before = record(at, None)
        for fit in threshold_candidates(negatives, positives):
            after = record(at, fit["threshold"])
            trials.append(
                {
                    "rho": rho,
                    "fit": fit,
                    "errors": errors(after),
                    "errors_before": errors(before),
                    "reliability": after,
                    "reliability_before": before,
                }
            )
    if not trials:
        return {
            "enabled": False,
            "reason": "at no budget did a backdoor the earlier stages missed score above every clean model",
            "trials": [],
        }
    best, enabled = choose(trials, baseline="errors_before")
    return {
        "enabled": enabled,
        "reason": f"{best['errors']} errors with spread at L2 {best['rho']:g}, threshold "
        f"{best['fit']['threshold']:.3f}, against {best['errors_before']} without it",
        "chosen": best,
        "trials": trials,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rhos = [float(v) for v in args.rhos.split(",") if v]
    results_file = Path(args.results)
    stored = json.loads(results_file.read_text()) if results_file.is_file() else {}
    rows = []
    for folder in model_folders(args.models, stored):
        for rho in rhos:
            steps = "" if args.steps == 40 else f"|steps{args.steps}"  # the stored results' keys have none
            key = f"{folder.name}|l2:{rho:g}{steps}|n{args.clean_count}|{args.scan_split}|s{args.scan_seed}"
            row = stored_scan(
                stored, results_file, key, lambda folder=folder, rho=rho: scan_row(folder, rho, args)
            )
            rows.append(row)
            print(
                f"{row['model']} l2 {rho:g}: spread {row['spread_score']:.3f} ({row['mode'] or 'clean'}) "
                f"earlier {row['verdict']} [{row['scan_seconds']:.0f}s]",
                flush=True,
            )
    used = [r for r in rows if usable(r, args)]
    families = {
        fam: fit_family([r for r in used if r["norm_family"] == fam], rhos)
        for fam in sorted({r["norm_family"] for r in used})
    }
    by_family, reliability = {}, {}
    for fam, fit in families.items():
        print(f"{fam}: {'enabled' if fit['enabled'] else 'not enabled'} ({fit['reason']})")
        if fit["enabled"]:
            best = fit["chosen"]
            by_family[fam] = {"rho": best["rho"], "steps": args.steps, "threshold": best["fit"]["threshold"]}
            reliability[fam] = best["reliability"]
    out = Path(args.out)
    calibration = json.loads(out.read_text()) if out.is_file() else {}
    calibration["spread"] = {
        "by_family": by_family,
        "reliability_by_family": reliability,
        "families": families,
        "rule": (
            "per normalisation family and candidate L2 budget, the candidate spread thresholds lie midway between "
            "the highest score of a clean model and each score above it of an implanted backdoor the earlier stages "
            "(BAN, reach where enabled) missed; all stages together (the earlier verdict where it fired, else an "
            "all-to-all verdict where spread fires) are counted against the earlier stages alone and the budget and "
            "cut with the fewest errors are kept (ties: the widest margin); enabled for a family only with fewer "
            f"errors than without it. Clean models below {args.min_acc} accuracy and backdoors below "
            f"{args.min_asr} ASR are listed but not used."
        ),
        "min_acc": args.min_acc,
        "min_asr": args.min_asr,
        "models": [{**r, "used": usable(r, args)} for r in rows],
        "date": datetime.date.today().isoformat(),
        "timm_purify_version": __version__,
        "command": recorded_command(sys.argv[1:] if argv is None else argv, script="calibrate_spread.py"),
        "environment": environment_info(),
    }
    out.write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"wrote the spread section of {out}")


if __name__ == "__main__":
    main()
