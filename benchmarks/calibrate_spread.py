"""Calibrate the universal-spread reading of ``timm_purify.scan`` (its all-to-all stage).

``calibrate_scan.py`` fits BAN, ``calibrate_reach.py`` the per-class reach; this script fits the
last readings (``timm_purify/detection/reach.py``), one shape per run (``--shape``): ``l2``,
one untargeted universal perturbation over the whole image (``universal_spread``), ``window``,
one pattern pasted in each window of a grid in turn (``window_spread``: patch triggers), or
``blend``, one pattern blended into the whole image (``blend_spread``: blended triggers); each
is scored by how many classes it moves, each elsewhere. It scans each given model folder
(written by ``build_backdoored_model``) with the shipped calibration (BAN, and reach where
enabled) and the spread reading forced on at every candidate budget (``--rhos`` for ``l2``,
``--windows`` for ``window``, ``--alphas`` for ``blend``), then, per normalisation family,
follows ``calibrate_reach.py``'s rule. With ``--alongside`` the family's calibrated readings of
other shapes stay and run first: each model's scores at them are taken too (stored beside), a
model one of them flags counts as found by the earlier stages, and the fitted reading is
appended to the family's list; without it the fitted shape replaces the family's readings:

1. candidate thresholds above every clean model: midway between the highest clean score and
   each score above it of an implanted backdoor the earlier stages missed (the reading is
   there to add detections, never false alarms);
2. the errors of all stages together (as ``scan`` combines them, ``combine_stages``: the
   earlier verdict where it fired, else an all-to-all verdict where spread fires) against the
   earlier stages alone, on the same models;
3. the budget and cut with the fewest errors (ties: the widest margin above the clean models,
   then the first budget); enabled for a family only with fewer errors than without it.

The result goes into the ``spread`` section of ``--out`` (the shipped calibration by default),
for the families among the given models only: another family's entry, models and the run behind
it (``provenance_by_family``) are kept, and other sections are left as they are. Scans are
stored in ``--results``.

Example (the commands behind the shipped entries are recorded in ``provenance_by_family``)::

    python benchmarks/calibrate_spread.py --rhos 2 'benchmarks/cache/calibrate_scan/*' \\
        'benchmarks/cache/fashion-mnist-*'
    python benchmarks/calibrate_spread.py --shape window --windows 8 --steps 30 \\
        'benchmarks/cache/calibrate_scan/resnet18-*' 'benchmarks/cache/calibrate_scan/test_resnet-*'
    python benchmarks/calibrate_spread.py --shape blend --alphas 0.1 --alongside \\
        'benchmarks/cache/calibrate_scan/resnet18-*' 'benchmarks/cache/calibrate_scan/test_resnet-*'
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
    check_verdicts,
    choose,
    earlier_stages,
    errors,
    model_folders,
    scan_folder,
    spread_fired,
    spread_label,
    spread_options,
    spread_scores,
    stored_scan,
    tally,
    threshold_candidates,
    usable,
)
from calibrate_scan import recorded_command  # noqa: E402

from timm_purify._train import environment_info  # noqa: E402
from timm_purify._version import __version__  # noqa: E402
from timm_purify.detection.ban import (  # noqa: E402
    CALIBRATION_FILE,
    DEFAULT_SPREAD,
    SPREAD_SHAPES,
    SPREAD_SIZES,
    ScanOptions,
    combine_stages,
    restarts_field,
    spread_entries,
    spread_plan,
)

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "models",
        nargs="+",
        help="model folders written by build_backdoored_model, or quoted glob patterns of them",
    )
    p.add_argument(
        "--shape",
        choices=SPREAD_SHAPES,
        default="l2",
        help="the reading's shape: one L2 perturbation over the image, or a pattern per window of a grid",
    )
    p.add_argument("--rhos", default="2", help="candidate L2 budgets at 3x32x32, comma list (--shape l2)")
    p.add_argument(
        "--windows", default="8", help="candidate window sides at 3x32x32, comma list (--shape window)"
    )
    p.add_argument("--alphas", default="0.1", help="candidate blend weights, comma list (--shape blend)")
    p.add_argument(
        "--alongside",
        action="store_true",
        help="keep the family's calibrated readings of other shapes, run before this one (their verdicts "
        "count as the earlier stages'); default: this shape replaces them",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of each perturbation or pattern (default: the shape's, "
        + ", ".join(f"{k} {v['steps']}" for k, v in DEFAULT_SPREAD.items())
        + "; the stored l2 results: 40)",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="perturbations the l2 reading fits, the best one kept (--shape l2; 1: the reading as first fitted)",
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
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_SPREAD[args.shape]["steps"]
    if args.restarts < 1 or (args.restarts > 1 and args.shape != "l2"):
        p.error("--restarts is a number >= 1, of the l2 reading only (--shape l2)")
    return args


# the option naming each shape's candidate sizes, and how a size is read
_CANDIDATES = {"l2": ("rhos", float), "window": ("windows", int), "blend": ("alphas", float)}


def budgets(args: argparse.Namespace) -> list[dict]:
    """The candidate budgets in ``scan``'s spelling (:func:`~timm_purify.detection.ban.spread_plan`)."""
    option, cast = _CANDIDATES[args.shape]
    size = SPREAD_SIZES[args.shape]
    return [
        {"shape": args.shape, size: cast(v), "steps": args.steps, **restarts_field(args.restarts)}
        for v in getattr(args, option).split(",")
        if v
    ]


def budget_of(entry: dict, prefix: str = "") -> tuple[str, float]:
    """The spread shape and size (L2 radius, window side or blend weight) of a trial or calibration
    entry, or with ``prefix="spread_"`` of a scan row; those written before the window shape carry
    only ``rho``."""
    shape = entry.get(f"{prefix}shape", "l2")
    return shape, entry[f"{prefix}{SPREAD_SIZES[shape]}"]


def budget_label(shape: str, size: float) -> str:
    return {"l2": "L2", "window": "window", "blend": "blend"}[shape] + f" {size:g}"


def row_key(folder: Path, budget: dict, args: argparse.Namespace) -> str:
    """The key a model's scan with the spread reading at ``budget`` is stored under in ``--results``
    (the stored l2 results' keys name steps only where not 40)."""
    shape, size = budget_of(budget)
    if shape == "l2":
        key = f"{folder.name}|l2:{size:g}" + ("" if budget["steps"] == 40 else f"|steps{budget['steps']}")
        key += f"|restarts{budget['restarts']}" if budget.get("restarts", 1) > 1 else ""
    else:
        key = f"{folder.name}|{shape}:{size:g}|steps{budget['steps']}"
    return key + f"|n{args.clean_count}|{args.scan_split}|s{args.scan_seed}"


def scan_row(folder: Path, budget: dict, args: argparse.Namespace) -> dict:
    """One model scanned with the shipped calibration and the spread reading on (never deciding)."""
    fields, report = scan_folder(
        folder, args, spread="on", **spread_options(budget), spread_threshold=float("inf")
    )
    return {
        **fields,
        # the earlier stages' verdict (BAN, and reach where the shipped calibration enables it)
        "verdict": report.verdict,
        "pattern": report.pattern,
        "suspected_target": report.suspected_target,
        "decided_by": report.config["decided_by"],
        **spread_options(budget),
        "spread_score": report.spread["score"],
        "spread_top_destination": report.spread["top_destination"],
        "spread_moved": [round(v, 4) for v in report.spread["moved"]],
        "spread_seconds": report.spread["seconds"],
        "scan_seconds": report.seconds,
    }


def record(rows: list[dict], threshold: float | None) -> dict:
    """All stages' record on ``rows`` (``threshold=None``: the earlier stages alone, with the
    family's readings of other shapes where this one runs beside them, ``--alongside``)."""
    results = []
    for r in rows:
        verdict, _, target, _ = combine_stages(
            (r["verdict"], r["pattern"], r["suspected_target"]),
            reach_fired=False,  # reach's part is already in the stored verdict
            reach_target=None,
            spread_fired=r.get("alongside_fired", False)
            or (threshold is not None and r["spread_score"] > threshold),
        )
        results.append((verdict == "backdoored", target))
    return tally(rows, results)


def fit_family(rows: list[dict], sizes: list[tuple[str, float]]) -> dict:
    """Every (budget, cut) with all stages' errors on ``rows``; the chosen one; whether enabled.
    ``sizes``: the candidate budgets as ``(shape, L2 radius or window side)``."""
    trials = []
    for shape, size in sizes:
        at = [r for r in rows if budget_of(r, "spread_") == (shape, size)]
        negatives = [r["spread_score"] for r in at if r["attack"] is None]
        positives = [
            r["spread_score"]
            for r in at
            if r["attack"] is not None and r["verdict"] != "backdoored" and not r.get("alongside_fired")
        ]
        if not negatives or not positives:
            continue
        before = record(at, None)
        for fit in threshold_candidates(negatives, positives):
            after = record(at, fit["threshold"])
            trials.append(
                {
                    "shape": shape,
                    SPREAD_SIZES[shape]: size,
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
        "reason": f"{best['errors']} errors with spread at {budget_label(*budget_of(best))}, threshold "
        f"{best['fit']['threshold']:.3f}, against {best['errors_before']} without it",
        "chosen": best,
        "trials": trials,
    }


def alongside(calibration: dict, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Per family, the calibrated readings of other shapes this one runs beside (``--alongside``:
    they run first, each at its own cut), as ``scan`` resolves them; none without the flag."""
    if not args.alongside:
        return {}
    by_family = (calibration.get("spread") or {}).get("by_family") or {}
    return {
        fam: [s for s in spread_plan(ScanOptions(), entry) if s["shape"] != args.shape]
        for fam, entry in by_family.items()
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    candidates = budgets(args)
    sizes = [budget_of(b) for b in candidates]
    results_file = Path(args.results)
    stored = json.loads(results_file.read_text()) if results_file.is_file() else {}
    out = Path(args.out)
    calibration = json.loads(out.read_text()) if out.is_file() else {}
    before = alongside(calibration, args)

    def scanned(folder: Path, budget: dict) -> dict:
        row = stored_scan(
            stored, results_file, row_key(folder, budget, args), lambda: scan_row(folder, budget, args)
        )
        print(
            f"{row['model']} {budget_label(*budget_of(budget))}: spread {row['spread_score']:.3f} "
            f"({row['mode'] or 'clean'}) earlier {row['verdict']} [{row['scan_seconds']:.0f}s]",
            flush=True,
        )
        return row

    rows = []
    for folder in model_folders(args.models, stored):
        for budget in candidates:
            row = scanned(folder, budget)
            others = before.get(row["norm_family"])
            # the family's other readings, in the scan's order, up to the first that fires (later ones
            # cannot change the verdict); only where the earlier stages found nothing, as the scan
            # runs them (a flagged model's are not read)
            if others and row["verdict"] != "backdoored":
                scores = spread_scores(others, lambda s, folder=folder: scanned(folder, s)["spread_score"])
                row = {**row, "alongside_fired": spread_fired(scores, others)}
            rows.append(row)
    used = [r for r in rows if usable(r, args)]
    families = {
        fam: fit_family([r for r in used if r["norm_family"] == fam], sizes)
        for fam in sorted({r["norm_family"] for r in used})
    }
    section = merged_section(calibration.get("spread") or {}, families, rows, args, argv)
    for fam, recount in recounts(calibration, section, families).items():
        print(f"{fam}: all stages on the reach section's models: {json.dumps(recount['reliability'])}")
        section["reliability_by_family"][fam] = recount.pop("reliability")
        section.setdefault("recounted_by_family", {})[fam] = recount
    calibration["spread"] = section
    out.write_text(json.dumps(calibration, indent=1) + "\n")
    print(f"wrote the spread section of {out} ({', '.join(families)})")


def recounts(calibration: dict, section: dict, families: dict[str, dict]) -> dict[str, dict]:
    """Per family enabled here whose reach stage was fitted on models of its own (the ``reach``
    section's ``models``), all stages' record on those: the earlier stages' verdicts at the
    calibration's cuts, and the family's spread readings counted, as the scan runs them, where they
    found nothing, from the scores taken of the same model (by name; this run's, and the section's
    of the readings it runs beside). A model the earlier stages missed without a score the scan
    would read is left out of the record and listed, so the
    record the scan quotes covers the calibration's models, not only the ones this run scanned."""
    out = {}
    for fam, fit in families.items():
        reach_rows = [
            m
            for m in (calibration.get("reach") or {}).get("models") or []
            if m["used"] and m["norm_family"] == fam
        ]
        if not fit["enabled"] or not reach_rows:
            continue
        settings = spread_plan(ScanOptions(), section["by_family"][fam])
        scores: dict[str, dict[str, float]] = {}  # per model, its score at each reading (spread_scores)
        for setting in settings:
            for m in section["models"]:
                if m["norm_family"] == fam and budget_of(m, "spread_") == budget_of(setting):
                    scores.setdefault(m["model"], {})[spread_label(setting)] = m["spread_score"]
        rows, earlier = check_verdicts(reach_rows, earlier_stages(calibration), fam)
        counted, results, left_out = [], [], []
        for row, (flagged, target) in zip(rows, earlier, strict=True):
            if not flagged:
                try:
                    flagged = spread_fired(scores.get(row["model"], {}), settings)
                except KeyError:  # a reading the scan would run on it that this run did not take
                    left_out.append(row["model"])
                    continue
                target = None if flagged else target  # an all-to-all verdict, as combine_stages gives it
            counted.append(row)
            results.append((flagged, target))
        out[fam] = {
            "note": f"reliability_by_family.{fam} counts all stages on the {len(counted)} of the reach section's "
            f"{len(rows)} {fam} models this run could count: the earlier stages' verdicts at the calibration's "
            "cuts, the spread reading where they found nothing; families."
            f"{fam} is this run's own fit, on the models it scanned",
            "reliability": tally(counted, results),
            "reliability_before": fit["chosen"]["reliability"],
            "left_out": left_out,
        }
    return out


def merged_section(
    old: dict, families: dict[str, dict], rows: list[dict], args: argparse.Namespace, argv: list[str] | None
) -> dict:
    """The ``spread`` section with ``families`` (fitted on ``rows``) replaced and every other
    family's entry, models, recount and provenance kept as ``old`` has them. A family's earlier
    fit of another shape is kept under its entry's ``earlier`` (the record of what was tried); a
    refit of the same shape replaces it. A fit declined beside the family's readings
    (``--alongside``, not enabled) leaves them as they were, and is kept under the family's fit as
    ``declined``."""
    run = {
        "command": recorded_command(sys.argv[1:] if argv is None else argv, script="calibrate_spread.py"),
        "date": datetime.date.today().isoformat(),
    }
    kept = {fam for fam in old.get("families") or {} if fam not in families}
    # the run behind a family fitted before per-family provenance: the section's own command
    legacy = {"command": old.get("command"), "date": old.get("date")}
    provenance = {fam: entry for fam, entry in (old.get("provenance_by_family") or {}).items() if fam in kept}
    for fam in kept - set(provenance):
        provenance[fam] = legacy
    section = {
        "by_family": {k: v for k, v in (old.get("by_family") or {}).items() if k in kept},
        "reliability_by_family": {
            k: v for k, v in (old.get("reliability_by_family") or {}).items() if k in kept
        },
        "families": {k: v for k, v in (old.get("families") or {}).items() if k in kept},
    }
    recounted = {k: v for k, v in (old.get("recounted_by_family") or {}).items() if k in kept}
    for fam, fit in families.items():
        print(f"{fam}: {'enabled' if fit['enabled'] else 'not enabled'} ({fit['reason']})")
        fit = {**fit, "shape": args.shape, **restarts_field(args.restarts)}
        before = (old.get("families") or {}).get(fam)
        run_before = (old.get("provenance_by_family") or {}).get(fam) or legacy
        # the family's readings of other shapes this one runs beside (--alongside), kept as they were
        beside = (
            [
                e
                for e in spread_entries((old.get("by_family") or {}).get(fam))
                if e.get("shape", "l2") != args.shape
            ]
            if args.alongside
            else []
        )
        if beside and not fit["enabled"]:
            # declined beside the family's readings: the scan runs them on exactly as they were (entry,
            # record, recount, provenance), and the attempt stays on record under the family's fit
            kept_fit = dict(before or {})
            kept_fit["declined"] = [*kept_fit.get("declined", []), {**fit, **run}]
            section["families"][fam] = kept_fit
            section["by_family"][fam] = old["by_family"][fam]
            for name, store in (
                ("reliability_by_family", section["reliability_by_family"]),
                ("recounted_by_family", recounted),
            ):
                if fam in (old.get(name) or {}):
                    store[fam] = old[name][fam]
            provenance[fam] = run_before
            continue
        if before is not None:
            if beside:  # the fit of the readings this one runs beside, with the run behind it
                fit["alongside"] = {**before, **run_before}
            else:
                if before.get("declined"):  # fits tried beside the one replaced stay on record
                    fit["declined"] = before["declined"]
                earlier = before.pop("earlier", [])
                # a refit of the same reading replaces it; one of another shape, or of the l2 shape
                # with other restarts, stays on record
                if (before.get("shape", "l2"), before.get("restarts", 1)) != (
                    args.shape,
                    fit.get("restarts", 1),
                ):
                    earlier = [*earlier, {**before, **run_before}]
                if earlier:
                    fit["earlier"] = earlier
        section["families"][fam] = fit
        provenance[fam] = run
        if fit["enabled"]:
            best = fit["chosen"]
            shape, size = budget_of(best)
            entry = {
                "shape": shape,
                SPREAD_SIZES[shape]: size,
                "steps": args.steps,
                **restarts_field(args.restarts),
                "threshold": best["fit"]["threshold"],
            }
            section["by_family"][fam] = [*beside, entry] if beside else entry
            section["reliability_by_family"][fam] = best["reliability"]
    return {
        **section,
        **({"recounted_by_family": recounted} if recounted else {}),
        "provenance_by_family": provenance,
        "rule": (
            "per normalisation family and candidate budget (an L2 radius, a window side or a blend weight), the "
            "candidate spread thresholds lie midway between the highest score of a clean model and each score above "
            "it of an implanted backdoor the earlier stages (BAN, reach where enabled, and the family's readings of "
            "other shapes where this one runs beside them) missed; all stages together (the "
            "earlier verdict where it fired, else an all-to-all verdict where spread fires) are counted against the "
            "earlier stages alone and the budget and cut with the fewest errors are kept (ties: the widest margin); "
            "enabled for a family only with fewer errors than without it. Clean models below "
            f"{args.min_acc} accuracy and backdoors below {args.min_asr} ASR are listed but not used."
        ),
        "min_acc": args.min_acc,
        "min_asr": args.min_asr,
        # the models behind every entry kept, and behind a fitted family's fits of other shapes
        "models": [
            m
            for m in old.get("models") or []
            if m["norm_family"] in kept or budget_of(m, "spread_")[0] != args.shape
        ]
        + [{**r, "used": usable(r, args)} for r in rows],
        **run,
        "timm_purify_version": __version__,
        "environment": environment_info(),
    }


if __name__ == "__main__":
    main()
