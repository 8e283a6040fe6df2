"""Two-fold check of ``calibrate_reach.py --refit-ban``: how its refit does on models it was not fitted on.

The refit chooses BAN's noise budget and cuts with the reach stage on the models it is given,
so its own record is in-sample. Here the family's models are split in two folds (``--fold-a``
and ``--fold-b``, e.g. the calibration zoo and a held-out set built later); the refit is run on
each fold with the candidate budgets and counted on the other, from the scans
``calibrate_reach.py`` stored (every model must have been scanned at every budget there, as a
refit with ``--ban-eps`` over both folds leaves it). Each way is run with every budget offered
together, and with each budget alone, so the choice of budget is checked too. Where the
family runs the spread reading, it is counted last on both folds, from the spread scores the
refit stored. The family's agreement condition (BAN's all-to-one verdict only where its two
readings name one class) is the calibration's unless ``--agreement on|off`` asks for the refit
with or without it (``calibrate_reach.py --agreement FAMILY``), so the condition can be checked
for a family before it is given one; where it applies, ``--fit-under-agreement`` checks the refit
that fits the cuts under it (``calibrate_reach.py --fit-under-agreement``) instead of the one that
applies it to cuts fitted without it. Likewise ``--split-cut on|off`` asks for the refit with or
without a split cut (``calibrate_reach.py --split-cut FAMILY``: a higher all-to-one cut where the
two readings name different classes), the calibration's otherwise. Nothing is written to the calibration; the result goes to ``--out``.

Example (the command behind ``results/reach/refit-batchnorm-crossfold.json`` is recorded in it)::

    python benchmarks/refit_crossfold.py --family batchnorm --eps 0.3,0.5,0.75 \\
        --fold-a 'benchmarks/cache/calibrate_scan/test_resnet-*' ... --fold-b ...
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
    at_eps,
    errors,
    model_folders,
    parse_budgets,
    record,
    refit_family,
    scan_key,
    spread_key,
    spread_label,
    spread_scores,
    spread_setting,
    usable,
)
from calibrate_scan import recorded_command  # noqa: E402

from timm_purify.detection.ban import (  # noqa: E402
    calibrated_agreement,
    calibrated_split_threshold,
    load_calibration,
)

ROOT = Path(__file__).resolve().parent.parent


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """The options :func:`fold_rows` reads: which stored scans (calibrate_reach.py's key) and
    which models count (its usability floors)."""
    p.add_argument("--budget", default="l2:1", help="the reach budget the scans were taken at")
    p.add_argument("--steps", type=int, default=20, help="reach's descent steps the scans were taken with")
    p.add_argument("--clean-count", type=int, default=600)
    p.add_argument("--scan-split", default="test")
    p.add_argument("--scan-seed", type=int, default=0)
    p.add_argument("--min-asr", type=float, default=0.5)
    p.add_argument("--min-acc", type=float, default=0.6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="batchnorm")
    p.add_argument("--eps", default="0.3,0.5,0.75", help="candidate noise budgets, comma list")
    p.add_argument("--fold-a", nargs="+", required=True, help="model folders or quoted globs")
    p.add_argument("--fold-b", nargs="+", required=True, help="model folders or quoted globs")
    add_scan_arguments(p)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "cache" / "calibrate_reach.json"))
    p.add_argument("--out", required=True)
    p.add_argument(
        "--fit-under-agreement",
        action="store_true",
        help="refit as calibrate_reach.py --fit-under-agreement does (the condition must apply)",
    )
    p.add_argument(
        "--agreement",
        choices=("calibration", "on", "off"),
        default="calibration",
        help="the agreement condition the refit runs with: the calibration's setting for the family, or "
        "on / off as calibrate_reach.py with / without --agreement FAMILY would refit it",
    )
    p.add_argument(
        "--split-cut",
        choices=("calibration", "on", "off"),
        default="calibration",
        help="whether the refit fits a split cut: as the calibration has the family (one recorded or not), "
        "or on / off as calibrate_reach.py with / without --split-cut FAMILY would refit it",
    )
    return p.parse_args(argv)


def fold_rows(
    patterns: list[str], eps: float, stored: dict, args: argparse.Namespace, spread: list[dict] | None = None
) -> list[dict]:
    """The fold's usable models of the family, with BAN's part at ``eps`` (as calibrate_reach.py
    merges a BAN-only rescan into the scan taken at the calibration's budget) and, where the
    family runs the spread reading (``spread``), each model's spread score."""
    norm, rho = parse_budgets(args.budget)[0]
    rows = []
    for folder in model_folders(patterns, stored):
        key = scan_key(folder, norm, rho, args)
        if key not in stored:
            raise SystemExit(
                f"{folder.name}: not scanned in {args.results}; run calibrate_reach.py on it first"
            )
        row = stored[key]
        if row["norm_family"] != args.family or not usable(row, args):
            continue

        def stored_ban(rescan_key: str, name: str = folder.name) -> dict:
            if rescan_key not in stored:
                raise SystemExit(f"{name}: no BAN scan at eps {eps:g}; refit with --ban-eps over it first")
            return stored[rescan_key]

        rows.append(at_eps(row, key, eps, stored_ban))
        if spread is not None:

            def stored_spread(setting: dict, key: str = key, name: str = folder.name) -> float:
                if spread_key(key, setting) not in stored:
                    raise SystemExit(
                        f"{name}: no spread score stored at {spread_label(setting)}; refit with --refit-ban over it first"
                    )
                return stored[spread_key(key, setting)]["spread_score"]

            rows[-1] = {**rows[-1], "spread_scores": spread_scores(spread, stored_spread)}
    return rows


def one_way(
    fit_on: list[str],
    test_on: list[str],
    budgets: list[float],
    shipped: BanCuts,
    stored: dict,
    args,
    spread: list[dict] | None = None,
    *,
    fit_split: bool = False,
) -> dict:
    """Refit on one fold with ``budgets`` offered, count the chosen setting on the other;
    ``shipped``: calibrate_scan.py's cuts, where the refit starts from; ``spread``: the family's
    spread setting where it runs (its threshold is counted last on both folds, as the refit does);
    ``fit_split``: the refit fits a split cut (``calibrate_reach.py --split-cut``)."""
    reach_budget = [parse_budgets(args.budget)[0]]
    fit = refit_family(
        {e: fold_rows(fit_on, e, stored, args, spread) for e in budgets},
        reach_budget,
        shipped,
        spread,
        fit_under_agreement=args.fit_under_agreement,
        fit_split=fit_split,
        count_original=False,  # calibrate_scan.py's cuts are not what is checked here
    )
    chosen = fit["chosen"]
    ban = replace(
        shipped,
        all_to_one=chosen["all_to_one_threshold"],
        all_to_all=chosen["all_to_all_threshold"],
        eps=chosen["eps"],
        split=chosen["split_threshold"],
    )
    test = fold_rows(test_on, chosen["eps"], stored, args, spread)
    rel = record(test, chosen["fit"] and chosen["fit"]["threshold"], chosen["target_when_both"], ban, spread)
    return {
        "budgets_offered": budgets,
        "chosen_eps": chosen["eps"],
        "all_to_one_threshold": chosen["all_to_one_threshold"],
        "all_to_all_threshold": chosen["all_to_all_threshold"],
        "split_threshold": chosen["split_threshold"],
        "reach_threshold": chosen["fit"] and chosen["fit"]["threshold"],
        "errors_on_fit": chosen["errors"],
        "errors_on_test": errors(rel),
        "test": rel,
    }


def write_out(out: dict, path: str, argv: list[str] | None, script: str) -> None:
    """``out`` with the command that made it (``script`` run with ``argv``), as JSON at ``path``."""
    out["command"] = recorded_command(sys.argv[1:] if argv is None else argv, script=script)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stored = json.loads(Path(args.results).read_text())
    budgets = sorted({float(e) for e in args.eps.split(",") if e})
    calibration = load_calibration()
    before = calibration["refitted_by_family"][args.family]["calibrate_scan_cuts"]
    # the refit it checks: calibrate_scan.py's cuts to start from, under the family's agreement condition
    shipped = BanCuts(
        before["all_to_one"],
        before["all_to_all"],
        calibration["target_source_by_family"][args.family],
        before["eps"],
        calibrated_agreement(calibration, args.family)
        if args.agreement == "calibration"
        else args.agreement == "on",
    )
    if args.fit_under_agreement and not shipped.agreement:
        raise SystemExit(
            f"--fit-under-agreement: the {args.family} family has no agreement condition to fit under "
            "(the calibration gives it none): add --agreement on"
        )
    fit_split = (
        calibrated_split_threshold(calibration, args.family) is not None
        if args.split_cut == "calibration"
        else args.split_cut == "on"
    )
    if fit_split and shipped.agreement:
        raise SystemExit(
            f"--split-cut: the {args.family} family's refit runs under the agreement condition, which never lets "
            "split readings decide; add --agreement off to check a split cut instead"
        )
    spread = spread_setting(calibration, args.family)
    offers = [budgets, *([e] for e in budgets)] if len(budgets) > 1 else [budgets]
    out = {
        "what": __doc__.split("\n")[0],
        "family": args.family,
        "spread": spread,
        "agreement": shipped.agreement,
        "fitted_under_agreement": args.fit_under_agreement,
        "fitted_split_cut": fit_split,
        "ways": [],
    }
    for name, fit_on, test_on in (("a -> b", args.fold_a, args.fold_b), ("b -> a", args.fold_b, args.fold_a)):
        for offered in offers:
            way = {
                "way": name,
                **one_way(fit_on, test_on, offered, shipped, stored, args, spread, fit_split=fit_split),
            }
            out["ways"].append(way)
            t = way["test"]
            print(
                f"{name} eps {','.join(f'{e:g}' for e in offered)}: chose {way['chosen_eps']:g}"
                + ("" if way["split_threshold"] is None else f" (split cut {way['split_threshold']:.3f})")
                + f", {way['errors_on_fit']} errors on the fit, {way['errors_on_test']} on the other fold "
                f"(clean flagged {t['false_positives']}/{t['clean_models']}, detected "
                f"{t['detected']}/{t['backdoored_models']}, targets {t['targets_correct']}/{t['all_to_one_models']})",
                flush=True,
            )
    write_out(out, args.out, argv, "refit_crossfold.py")


if __name__ == "__main__":
    main()
