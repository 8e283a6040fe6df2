"""Offline check of a second BAN all-to-one cut for split readings, on stored scans.

BAN's all-to-one verdict has one cut; for LayerNorm models it also needs the noise alone and
the noise with the negative mask to name the same class (``ban.agrees``). On BatchNorm models
the clean models BAN flags read split, but so do backdoors BAN reads far above them, which that
condition would withdraw. This script counts a rule with two cuts: the family's shipped cut
where the two readings agree, and a higher *split cut* where they split, fitted midway between
the highest clean model with split readings and the next split reading above it. Every other
cut (all-to-all, reach) is the shipped calibration's, and the rows are the scans
``calibrate_reach.py`` stored, so nothing is rescanned and nothing is written to the calibration.

Each ``--fold`` is counted with the split cut fitted on the other folds (leave one set out),
and ``--check`` with the split cut fitted on every fold; each beside the shipped rule on the
same models. The result goes to ``--out`` (``benchmarks/DETECTION.md`` quotes it).

Example (the command behind ``results/reach/split-cut-batchnorm.json`` is recorded in it)::

    python benchmarks/split_cut.py --results benchmarks/results/reach/scans-batchnorm-calibration-and-fresh-1-3.json \\
        --fold calibration <folders> --fold fresh1 <folders> --fold fresh3 <folders> \\
        --check-results benchmarks/results/reach/scans-heldout-batchnorm.json --check <folders> --out FILE
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts
from calibrate_reach import BanCuts, errors, spread_setting, tally, verdicts  # noqa: E402
from refit_crossfold import add_scan_arguments, fold_rows, write_out  # noqa: E402

from timm_purify.detection.ban import agrees, calibrated_decision, calibrated_eps, load_calibration  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="batchnorm")
    p.add_argument(
        "--fold",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "FOLDER"),
        help="a named set of model folders (or quoted globs) scanned in --results; give two or more",
    )
    p.add_argument("--results", required=True, help="the store the folds' scans are in")
    p.add_argument(
        "--check", nargs="+", default=[], help="model folders counted with the cut fitted on all folds"
    )
    p.add_argument("--check-results", help="the store --check's scans are in (default: --results)")
    add_scan_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if len(args.fold) < 2 or any(len(fold) < 2 for fold in args.fold):
        raise SystemExit(
            "give two or more --fold NAME FOLDER [FOLDER ...]: each is counted after a fit on the others"
        )
    return args


def split(row: dict) -> bool:
    """Whether BAN's two readings name different classes (the opposite of ``ban.agrees``)."""
    return not agrees(row["ban_statistics"])


def fit_split_cut(rows: list[dict]) -> float | None:
    """Midway between the highest all-to-one score of a clean model with split readings and the
    next split reading above it (none above: that clean score itself, so every split reading is
    withdrawn; ``None``: no clean model reads split, nothing to clear)."""
    clean = [r["ban_statistics"]["all_to_one"] for r in rows if r["attack"] is None and split(r)]
    if not clean:
        return None
    top = max(clean)
    above = [
        r["ban_statistics"]["all_to_one"]
        for r in rows
        if split(r) and r["ban_statistics"]["all_to_one"] > top
    ]
    return (top + min(above)) / 2 if above else top


def count(rows: list[dict], ban: BanCuts, reach: dict | None, split_cut: float | None) -> dict:
    """Both stages' record at the shipped cuts, BAN's all-to-one verdict needing agreement below
    ``split_cut`` (``None``: the shipped rule, ``ban.agreement`` as the calibration has it)."""
    threshold = reach and reach["threshold"]
    when_both = reach["target_when_both"] if reach else "ban"
    results = []
    for row in rows:
        cuts = ban
        if split_cut is not None:
            cuts = replace(
                ban, agreement=not (split(row) and row["ban_statistics"]["all_to_one"] > split_cut)
            )
        results += verdicts([row], threshold, when_both, cuts)
    rec = tally(rows, results)
    return {"errors": errors(rec), **rec}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    calibration = load_calibration()
    fam = args.family
    eps = calibrated_eps(calibration, fam)
    decision = calibrated_decision(calibration, fam)
    if decision["agreement"]:
        raise SystemExit(
            f"{fam} already needs agreement at every score; a split cut only adds to a family without it"
        )
    if spread_setting(calibration, fam) is not None:
        raise SystemExit(f"{fam} runs the spread reading, which this count leaves out; not supported")
    ban = BanCuts(decision["threshold"], decision["all_to_all_threshold"], decision["target_source"], eps)
    reach = ((calibration.get("reach") or {}).get("by_family") or {}).get(fam)
    stored = json.loads(Path(args.results).read_text())
    folds = {name: fold_rows(patterns, eps, stored, args) for name, *patterns in args.fold}
    out = {
        "what": __doc__.split("\n")[0],
        "family": fam,
        "shipped": {"eps": eps, "all_to_one": ban.all_to_one},
        "folds": [],
    }

    def counted(rows: list[dict], fitted_on: list[dict]) -> dict:
        """``rows`` counted with the split cut fitted on ``fitted_on``, beside the shipped rule."""
        cut = fit_split_cut(fitted_on)
        return {
            "models": len(rows),
            "split_cut": cut,
            "two_cuts": count(rows, ban, reach, cut),
            "shipped": count(rows, ban, reach, None),
        }

    for name, rows in folds.items():
        others = [r for other, fit in folds.items() if other != name for r in fit]
        out["folds"].append({"counted_on": name, **counted(rows, others)})
    if args.check:
        check_store = json.loads(Path(args.check_results or args.results).read_text())
        # fold_rows names args.results where a scan is missing: name --check's store
        check_args = argparse.Namespace(**{**vars(args), "results": args.check_results or args.results})
        rows = fold_rows(args.check, eps, check_store, check_args)
        out["check"] = counted(rows, [r for fit in folds.values() for r in fit])
    for entry in [*out["folds"], *([{"counted_on": "--check", **out["check"]}] if args.check else [])]:
        two, ship = entry["two_cuts"], entry["shipped"]
        cut = "none" if entry["split_cut"] is None else f"{entry['split_cut']:.3f}"
        print(
            f"{entry['counted_on']} ({entry['models']} models): split cut {cut}: {two['errors']} errors "
            f"({two['false_positives']}/{two['clean_models']} clean flagged); shipped {ship['errors']} "
            f"({ship['false_positives']}/{ship['clean_models']})",
            flush=True,
        )
    write_out(out, args.out, argv, "split_cut.py")


if __name__ == "__main__":
    main()
