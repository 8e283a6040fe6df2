"""Offline check of a second BAN all-to-one cut for split readings, on stored scans.

BAN's all-to-one verdict has one cut; for LayerNorm models it also needs the noise alone and
the noise with the negative mask to name the same class (``ban.agrees``). On BatchNorm models
the clean models BAN flags read split, but so do backdoors BAN reads far above them, which that
condition would withdraw. This script counts a rule with two cuts: the family's shipped cut
where the two readings agree, and a higher *split cut* where they split, fitted midway between
the highest clean model with split readings and the next split reading above it. Every other
cut (all-to-all, reach) is the shipped calibration's, or with ``--refit-reach`` reach's is refitted
behind the split cut (``calibrate_reach.py --split-cut`` fits the same split cut with the other
cuts refitted around it, or with ``--keep-ban-cuts`` reach's alone), and the rows are the scans
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
from calibrate_reach import (  # noqa: E402
    BanCuts,
    errors,
    fit_family,
    fit_split_cut,
    parse_budgets,
    record,
    spread_setting,
)
from refit_crossfold import add_scan_arguments, fold_rows, write_out  # noqa: E402

from timm_purify.detection.ban import calibrated_decision, calibrated_eps, load_calibration  # noqa: E402


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
    p.add_argument(
        "--results", nargs="+", required=True, help="the stores the folds' scans are in (read together)"
    )
    p.add_argument(
        "--check", nargs="+", default=[], help="model folders counted with the cut fitted on all folds"
    )
    p.add_argument("--check-results", help="the store --check's scans are in (default: --results)")
    p.add_argument(
        "--refit-reach",
        action="store_true",
        help="refit reach's cut behind BAN's cuts and the split cut on the same models the split cut is "
        "fitted on, as calibrate_reach.py --split-cut F --keep-ban-cuts F does (default: reach's shipped cut)",
    )
    add_scan_arguments(p)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if len(args.fold) < 2 or any(len(fold) < 2 for fold in args.fold):
        raise SystemExit(
            "give two or more --fold NAME FOLDER [FOLDER ...]: each is counted after a fit on the others"
        )
    return args


def count(rows: list[dict], ban: BanCuts, reach: dict | None, split_cut: float | None) -> dict:
    """Both stages' record at the shipped cuts with ``split_cut`` (``None``: the shipped rule)."""
    rec = record(
        rows,
        reach and reach["threshold"],
        reach["target_when_both"] if reach else "ban",
        replace(ban, split=split_cut),
    )
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
    if decision["split_threshold"] is not None:
        raise SystemExit(f"{fam} already has a split cut; this count adds one to a family without it")
    if spread_setting(calibration, fam) is not None:
        raise SystemExit(f"{fam} runs the spread reading, which this count leaves out; not supported")
    ban = BanCuts(decision["threshold"], decision["all_to_all_threshold"], decision["target_source"], eps)
    reach = ((calibration.get("reach") or {}).get("by_family") or {}).get(fam)
    stored = {key: row for path in args.results for key, row in json.loads(Path(path).read_text()).items()}
    # fold_rows names the store where a scan is missing
    shown = argparse.Namespace(**{**vars(args), "results": " ".join(args.results)})
    folds = {name: fold_rows(patterns, eps, stored, shown) for name, *patterns in args.fold}
    out = {
        "what": __doc__.split("\n")[0],
        "family": fam,
        "shipped": {"eps": eps, "all_to_one": ban.all_to_one},
        "folds": [],
    }

    def refit_reach(fitted_on: list[dict], cut: float | None) -> dict | None:
        """Reach's cut and target rule fitted on ``fitted_on`` behind BAN's cuts and the split cut
        (calibrate_reach.py's fit_family; ``None``: reach does not pay there)."""
        fit = fit_family(fitted_on, parse_budgets(args.budget)[:1], replace(ban, split=cut))
        if not fit["enabled"]:  # also where no trial was possible (then there is no "chosen")
            return None
        return {
            "threshold": fit["chosen"]["fit"]["threshold"],
            "target_when_both": fit["chosen"]["target_when_both"],
        }

    def counted(rows: list[dict], fitted_on: list[dict]) -> dict:
        """``rows`` counted with the split cut (and, with --refit-reach, reach's cut) fitted on
        ``fitted_on``, beside the shipped rule."""
        cut = fit_split_cut(fitted_on)
        behind = refit_reach(fitted_on, cut) if args.refit_reach else reach
        return {
            "models": len(rows),
            "split_cut": cut,
            "reach": behind,
            "two_cuts": count(rows, ban, behind, cut),
            "shipped": count(rows, ban, reach, None),
        }

    for name, rows in folds.items():
        others = [r for other, fit in folds.items() if other != name for r in fit]
        out["folds"].append({"counted_on": name, **counted(rows, others)})
    if args.check:
        check_store = json.loads(Path(args.check_results).read_text()) if args.check_results else stored
        check_args = argparse.Namespace(**{**vars(shown), "results": args.check_results or shown.results})
        rows = fold_rows(args.check, eps, check_store, check_args)
        out["check"] = counted(rows, [r for fit in folds.values() for r in fit])
    for entry in [*out["folds"], *([{"counted_on": "--check", **out["check"]}] if args.check else [])]:
        two, ship = entry["two_cuts"], entry["shipped"]
        cut = "none" if entry["split_cut"] is None else f"{entry['split_cut']:.3f}"
        behind = "no reach" if entry["reach"] is None else f"reach {entry['reach']['threshold']:.3f}"
        print(
            f"{entry['counted_on']} ({entry['models']} models): split cut {cut}, {behind}: {two['errors']} errors "
            f"({two['false_positives']}/{two['clean_models']} clean flagged); shipped {ship['errors']} "
            f"({ship['false_positives']}/{ship['clean_models']})",
            flush=True,
        )
    write_out(out, args.out, argv, "split_cut.py")


if __name__ == "__main__":
    main()
