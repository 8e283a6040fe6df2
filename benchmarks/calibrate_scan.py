"""Calibrate the thresholds of ``timm_purify.scan`` on clean and backdoored models.

Builds (or reuses from ``--cache``) one small model per architecture x attack x seed with the
library itself (``timm_purify._train.build_backdoored_model``), scans each with the same
clean images, and chooses the two thresholds (all-to-one and all-to-all statistics) that
separate the clean models from the backdoored ones. The result, with every model, score and
the rule used, is written to ``--out`` (by default the file the library ships,
``timm_purify/detection/calibration.json``).

Examples::

    # small (CPU only); the command behind the shipped file is recorded in it ("command")
    python benchmarks/calibrate_scan.py --archs resnet18,vit_tiny --seeds 0,1,2 \
        --attacks none,badnets,blended,badnets@mode=all-to-all --epochs 3 --train-size 2000

    # BatchNorm models scanned at their own budget, plus fully trained models built by
    # benchmarks/run.py (scanned on the test split of the data they were trained on)
    python benchmarks/calibrate_scan.py --archs test_resnet --seeds 0,1 \
        --scan-option batchnorm:eps=0.75 \
        --model-dir benchmarks/cache/fashion-mnist-resnet18-clean-p0.1-e3-b64-s0

    # the noise budget chosen per family among candidates (each model scanned at each)
    python benchmarks/calibrate_scan.py --archs test_resnet,test_vit --seeds 0,1 \
        --eps-candidates 0.3,0.5,0.75

    # the issue's full target: 20 clean + 20 backdoored over four architectures
    python benchmarks/calibrate_scan.py --archs resnet18,convnext_atto,vit_tiny,efficientnet_b0 \
        --seeds 0,1,2,3,4 --attacks none,badnets,blended,badnets@mode=all-to-all,wanet --epochs 10

Models are cached under ``--cache/<arch>-<attack>-<mode>-s<seed>-e<epochs>-n<train size>``
as timm folders, so a second run only scans. ``--rescore`` recomputes the statistics from the
confusion matrices stored in ``--results`` without scanning again (for changes to the
statistic only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import timm
import torch

from timm_purify._train import TrainConfig, build_backdoored_model, environment_info
from timm_purify._version import __version__
from timm_purify.attacks import build_attack
from timm_purify.data import clean_subset, load_data
from timm_purify.detection.ban import (
    CALIBRATION_FILE,
    DEFAULT_EPS,
    TARGET_SOURCES,
    ScanOptions,
    norm_family,
    scan,
    scan_statistics,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Recipe:
    """How one architecture is built and trained from scratch at 32x32."""

    model: str
    kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4


RECIPES = {
    "resnet18": Recipe("resnet18"),
    "vit_tiny": Recipe(
        "vit_tiny_patch16_224", {"patch_size": 4, "depth": 4}, optimizer="adamw", lr=1e-3, weight_decay=0.05
    ),
    "vit_tiny_full": Recipe(
        "vit_tiny_patch16_224", {"patch_size": 4}, optimizer="adamw", lr=1e-3, weight_decay=0.05
    ),
    "convnext_atto": Recipe("convnext_atto", optimizer="adamw", lr=2e-3, weight_decay=0.05),
    # SGD 0.05 left it at 34% clean accuracy after 3 epochs on 2,000 images; AdamW reaches 52%
    "efficientnet_b0": Recipe("efficientnet_b0", optimizer="adamw", lr=2e-3, weight_decay=0.05),
    # timm's own tiny test architectures (0.2-0.4M parameters): real ResNet / ViT code, cheap
    # enough on a CPU to calibrate over many seeds
    "test_resnet": Recipe("test_resnet"),
    "test_vit": Recipe("test_vit", optimizer="adamw", lr=1e-3, weight_decay=0.05),
}
# the normalisation families thresholds and budgets are calibrated for (see norm_family)
FAMILIES = ("batchnorm", "other")
# all-to-one targets cycle with the seed so the calibration also checks that targets are found
TARGETS = (3, 7, 1, 5, 9, 0, 2, 4, 6, 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        default="resnet18,vit_tiny",
        help=f"comma list among {', '.join(RECIPES)}; ARCH@0+1 gives that arch its own seeds",
    )
    p.add_argument(
        "--attacks",
        default="none,badnets@patch_size=6,blended,badnets@patch_size=6@mode=all-to-all",
        help="comma list of attacks: 'none' (clean model), NAME or NAME@field=value@... "
        "(e.g. badnets@patch_size=6@mode=all-to-all); all-to-one targets cycle with the seed; "
        "@epochs=N trains that attack's models for N epochs instead of --epochs",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma list of training seeds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--train-size", type=int, default=2000, help="class-balanced training subset")
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--data", default="fashion-mnist-mini")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument(
        "--scan-split",
        default="test",
        help="split the scan's clean images come from (not used for training: 'test')",
    )
    p.add_argument("--clean-count", type=int, default=600, help="clean images per scan (1%% of 60k)")
    p.add_argument("--scan-seed", type=int, default=0)
    p.add_argument("--min-asr", type=float, default=0.5, help="backdoors below this ASR did not implant")
    p.add_argument(
        "--min-acc",
        type=float,
        default=0.6,
        help="models below this clean accuracy did not learn the task (listed, not used); the "
        "zoo's resnet18/convnext_atto/test models reach 0.67-0.82, its 3-epoch efficientnet_b0 and "
        "vit_tiny only 0.41-0.59, and those collapse onto one class under the noise (see "
        "benchmarks/DETECTION.md)",
    )
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / "cache" / "calibrate_scan"))
    p.add_argument("--results", default=None, help="per-model results (default: <cache>/results.json)")
    p.add_argument("--out", default=str(CALIBRATION_FILE))
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="RESULTS_JSON",
        help="also calibrate on the models stored in another results file (e.g. a zoo built with "
        "other --train-size/--epochs); only rows scanned with the same scan options are used",
    )
    p.add_argument("--rescore", action="store_true", help="recompute statistics from stored results")
    p.add_argument("--no-write", action="store_true", help="print the thresholds, write nothing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--scan-option",
        action="append",
        default=[],
        metavar="[FAMILY:]KEY=VALUE",
        help="scan option other than its default (repeatable), e.g. eps=0.1, or for the models of one "
        "normalisation family only, e.g. batchnorm:eps=0.75; recorded in the output (the budget per "
        "family as eps_by_family, which the scan then uses by default)",
    )
    p.add_argument(
        "--eps-candidates",
        action="append",
        default=[],
        metavar="[FAMILY:]EPS,EPS,...",
        help="noise budgets to choose from (repeatable), for every family or one, e.g. "
        "batchnorm:0.3,0.5,0.75: each model of that family is scanned at each budget and the family "
        "gets the budget whose fitted thresholds make the fewest errors on its models (see "
        "choose_budgets); overrides that family's eps from --scan-option",
    )
    p.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="also scan this model folder, written by timm_purify's build_backdoored_model (e.g. a "
        "fully trained model of benchmarks/run.py's cache), on --clean-count images of the --scan-split "
        "of the data it was trained on (repeatable)",
    )
    return p.parse_args(argv)


def family_scope(flag: str, item: str, head: str) -> tuple[str, str]:
    """Split ``[FAMILY:]REST`` (``head``, from ``flag``'s value ``item``) into the family
    (``""``: every family) and the rest, refusing families that are not calibrated."""
    scope, colon, rest = head.rpartition(":")
    if colon and scope not in FAMILIES:
        raise SystemExit(f"{flag} {item!r}: unknown family {scope!r}; known: {', '.join(FAMILIES)}")
    return scope, rest


def scan_options(args: argparse.Namespace) -> dict[str, ScanOptions]:
    """The scan options per normalisation family from ``--scan-option`` (key ``""``: every other
    family). The budget is always explicit here: left to the scan, it would come from the
    calibration file being replaced."""
    common: dict = {}
    by_family: dict[str, dict] = {}
    for item in args.scan_option:
        head, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--scan-option {item!r} is not [FAMILY:]KEY=VALUE")
        scope, key = family_scope("--scan-option", item, head)
        (by_family.setdefault(scope, {}) if scope else common)[key] = json.loads(value)
    common.setdefault("eps", DEFAULT_EPS)
    options = {"": ScanOptions(**common)}
    options |= {fam: ScanOptions(**(common | own)) for fam, own in by_family.items()}
    for opts in options.values():
        opts.validate()
    return options


def options_for(options: dict[str, ScanOptions], family: str) -> ScanOptions:
    """The options a model of ``family`` is scanned with (see :func:`scan_options`)."""
    return options.get(family, options[""])


def budget_candidates(
    args: argparse.Namespace, options: dict[str, ScanOptions]
) -> dict[str, list[ScanOptions]]:
    """The options each family's models are scanned with: one per ``--eps-candidates`` budget
    (a family's own list before the common one), else just its ``--scan-option`` options."""
    lists: dict[str, list[float]] = {}
    for item in args.eps_candidates:
        scope, values = family_scope("--eps-candidates", item, item)
        try:
            budgets = sorted({float(v) for v in values.split(",") if v})
        except ValueError:
            raise SystemExit(f"--eps-candidates {item!r} is not [FAMILY:]EPS,EPS,...") from None
        if not budgets:
            raise SystemExit(f"--eps-candidates {item!r} names no budget")
        lists[scope] = budgets
    out = {}
    for family in FAMILIES:
        base = options_for(options, family)
        budgets = lists.get(family, lists.get(""))
        out[family] = [replace(base, eps=eps) for eps in budgets] if budgets else [base]
        for opts in out[family]:
            opts.validate()
    return out


def non_default(opts: ScanOptions) -> dict:
    """The options that differ from a scan at the paper's budget with every other default,
    as they appear in a result's key."""
    base = asdict(ScanOptions(eps=DEFAULT_EPS))
    return {k: v for k, v in asdict(opts).items() if v != base[k]}


def model_dir(cache: Path, arch: str, attack: str, seed: int, args: argparse.Namespace) -> Path:
    name = "-".join(p for p in attack.split("@") if not p.startswith("epochs="))
    name = name.replace("=", "").replace("all-to-all", "a2a")
    epochs = spec_epochs(attack, args.epochs)
    return (
        cache / f"{arch}-{name}-s{seed}-e{epochs}-b{args.batch_size}-n{args.train_size}-p{args.poison_rate:g}"
    )


def make_attack(spec: str, seed: int, num_classes: int, poison_rate: float):
    """``none``, ``NAME`` or ``NAME@field=value@...`` (e.g. ``badnets@patch_size=6@mode=all-to-all``)."""
    if spec == "none":
        return None
    name, *fields = spec.split("@")
    kwargs = {"seed": seed, "num_classes": num_classes, "poison_rate": poison_rate}
    for item in fields:
        if item.startswith("epochs="):
            continue  # a training setting (see spec_epochs), not a field of the attack
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"attack field {item!r} in {spec!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    if kwargs.get("mode", "all-to-one") == "all-to-one":
        kwargs.setdefault("target", TARGETS[seed % len(TARGETS)])
    return build_attack(name, **kwargs)


def spec_epochs(spec: str, default: int) -> int:
    """Training epochs for one attack: ``@epochs=N`` in its spec (all-to-all backdoors need
    more than all-to-one ones to implant), else ``--epochs``."""
    for item in spec.split("@")[1:]:
        if item.startswith("epochs="):
            return int(item.partition("=")[2])
    return default


def get_model(arch: str, attack: str, seed: int, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The cached model folder, built on first use; returns the model and its training record."""
    recipe = RECIPES[arch]
    out = model_dir(Path(args.cache), arch, attack, seed, args)
    if not (out / "training.json").is_file():
        atk = make_attack(attack, seed, 10, args.poison_rate)
        config = TrainConfig(
            epochs=spec_epochs(attack, args.epochs),
            batch_size=args.batch_size,
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            optimizer=recipe.optimizer,
            seed=seed,
        )
        t0 = time.perf_counter()
        torch.manual_seed(seed)  # timm draws the initial weights from the global generator
        build_backdoored_model(
            model=recipe.model,
            data=args.data,
            attack=atk,
            out_dir=out,
            img_size=args.img_size,
            config=config,
            train_size=args.train_size,
            model_kwargs=recipe.kwargs,
            quiet=True,
        )
        print(f"  built {out.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return load_dir(out)


def load_dir(folder: Path) -> tuple[torch.nn.Module, dict]:
    """A model folder written by ``build_backdoored_model`` and its training record."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return model, json.loads((folder / "training.json").read_text())


def family_of(arch: str, kwargs: dict) -> str:
    """The normalisation family of an architecture (built without weights, on the meta device)."""
    with torch.device("meta"):
        return norm_family(timm.create_model(arch, **kwargs))


def rescore(rows: list[dict]) -> None:
    for row in rows:
        c = row["confusions"]
        row["statistics"] = scan_statistics(
            torch.tensor(c["noisy"]), torch.tensor(c["noisy_masked"]), torch.tensor(c["clean"])
        )


def family_reliability(implanted: list[dict]) -> dict[str, dict]:
    """How far a verdict can be trusted, per normalisation family, measured on the calibration
    models with the chosen thresholds; ``scan`` copies its family's entry into each report."""
    out = {}
    for fam in sorted({r["norm_family"] for r in implanted}):
        rows = [r for r in implanted if r["norm_family"] == fam]
        clean = [r for r in rows if r["attack"] is None]
        bad = [r for r in rows if r["attack"] is not None]
        one = [r for r in bad if r["mode"] == "all-to-one"]
        out[fam] = {
            "archs": sorted({r["arch"] for r in rows}),
            "clean_models": len(clean),
            "false_positives": sum(r["detected"] for r in clean),
            "backdoored_models": len(bad),
            "detected": sum(r["detected"] for r in bad),
            "all_to_one_models": len(one),
            "targets_correct": sum(bool(r["target_found"]) for r in one),
        }
    return out


def choose_target_sources(one: list[dict]) -> dict[str, dict]:
    """Per normalisation family, whose predictions name the target of the all-to-one
    backdoors more often: the noisy model's or the noisy model's with the negative mask
    (ties keep ``"noisy"``, the paper's reading). Counted over every implanted all-to-one
    model, detected or not, since the source does not change the verdict."""
    out = {}
    for fam in sorted({r["norm_family"] for r in one}):
        rows = [r for r in one if r["norm_family"] == fam]
        right = {
            source: sum(r["statistics"][key] == r["target"] for r in rows)
            for source, key in TARGET_SOURCES.items()
        }
        best = max(TARGET_SOURCES, key=lambda source: (right[source], source == "noisy"))
        out[fam] = {"source": best, "right": right, "models": len(rows)}
    return out


def reported_target(row: dict, sources: dict[str, dict]) -> int:
    """The class a scan of ``row``'s model reports: its family's target source (noisy when the
    calibration holds no all-to-one model of that family)."""
    fit = sources.get(row["norm_family"])
    return row["statistics"][TARGET_SOURCES[fit["source"] if fit else "noisy"]]


def choose_threshold(negatives: list[float], positives: list[float]) -> dict:
    """Midway between the highest negative and the lowest positive when they separate;
    otherwise the cut with the fewest errors (ties: the middle one), flagged as not separable."""
    if not negatives or not positives:
        raise SystemExit("need at least one clean and one backdoored model per statistic to calibrate")
    hi_neg, lo_pos = max(negatives), min(positives)
    if hi_neg < lo_pos:
        return {
            "threshold": (hi_neg + lo_pos) / 2,
            "separable": True,
            "margin": (lo_pos - hi_neg) / 2,
            "errors": 0,
        }
    values = sorted(set(negatives) | set(positives))
    cuts = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    cuts.append(hi_neg + (1.0 - hi_neg) / 2)  # above every negative: no false positive at all
    scored = [(sum(v > c for v in negatives) + sum(v <= c for v in positives), c) for c in cuts]
    best = min(e for e, _ in scored)
    good = [c for e, c in scored if e == best]
    return {"threshold": good[len(good) // 2], "separable": False, "margin": 0.0, "errors": best}


def recorded_command(argv: list[str], script: str = "calibrate_scan.py") -> str:
    """The command line stored with the calibration, without ``--out`` and its path.

    The output path is where this run wrote, not part of what makes the calibration, and a
    re-run of the recorded command should rewrite the shipped file; both spellings
    (``--out PATH`` and ``--out=PATH``) are dropped.
    """
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--out":
            skip_value = True
        elif not arg.startswith("--out="):
            kept.append(shlex.quote(arg))
    return " ".join([f"python benchmarks/{script}", *kept])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    results_file = Path(args.results) if args.results else cache / "results.json"
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arch_seeds: dict[str, list[int]] = {}
    for item in (a for a in args.archs.split(",") if a):
        arch, _, own = item.partition("@")
        arch_seeds[arch] = [int(s) for s in own.split("+")] if own else seeds
    unknown = [a for a in arch_seeds if a not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown arch(s) {unknown}; known: {', '.join(RECIPES)}")
    attacks = [a for a in args.attacks.split(",") if a]
    options = scan_options(args)
    stored = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # (name in the key, arch, seed, family, how to get the model and its training record, its data)
    jobs: list[tuple[str, str, int | None, str, Callable[[], tuple[torch.nn.Module, dict]], str]] = []
    families = {arch: family_of(RECIPES[arch].model, RECIPES[arch].kwargs) for arch in arch_seeds}
    for seed in sorted({s for own in arch_seeds.values() for s in own}):
        for arch in (a for a, own in arch_seeds.items() if seed in own):
            for attack in attacks:
                jobs.append(
                    (
                        model_dir(cache, arch, attack, seed, args).name,
                        arch,
                        seed,
                        families[arch],
                        partial(get_model, arch, attack, seed, args),
                        args.data,
                    )
                )
    for folder in map(Path, args.model_dir):
        if not (folder / "training.json").is_file():
            raise SystemExit(
                f"--model-dir {folder}: no training.json (not written by build_backdoored_model)"
            )
        record = json.loads((folder / "training.json").read_text())
        family = family_of(record["model"], record["model_kwargs"])
        jobs.append(
            (
                folder.name,
                record["model"],
                record["train"]["seed"],
                family,
                partial(load_dir, folder),
                record["data"],
            )
        )
    candidates = budget_candidates(args, options)
    rows: list[dict] = []
    for name, arch, seed, family, load, data_name in jobs:
        loaded = None  # the model, its record and its scan images, once for all budgets
        for opts in candidates[family]:
            key = f"{name}|scan{args.scan_seed}|n{args.clean_count}" + "".join(
                f"|{k}={v}" for k, v in sorted(non_default(opts).items())
            )
            if key in stored and (args.rescore or stored[key].get("scan_options") == asdict(opts)):
                rows.append(stored[key])
                continue
            if args.rescore:
                raise SystemExit(f"--rescore: {key} has no stored result; run without --rescore first")
            if loaded is None:
                model, record = load()
                data = load_data(data_name, split=args.scan_split, model=model)
                loaded = model, record, clean_subset(data, count=args.clean_count, seed=args.scan_seed)
            model, record, data = loaded
            report = scan(
                model,
                data,
                seed=args.scan_seed,
                quiet=True,
                **{**asdict(opts), "threshold": 1e9, "all_to_all_threshold": 1e9},
            )
            spec = record.get("attack")
            row = {
                "key": key,
                "arch": arch,
                "model": record["model"],
                "model_kwargs": record["model_kwargs"],
                "attack": None if spec is None else spec["name"],
                "mode": None if spec is None else spec["mode"],
                "target": None if spec is None or spec["mode"] != "all-to-one" else spec["target"],
                "seed": seed,
                "data": data_name,
                "train_size": record["train_size"],
                "epochs": record["train"]["epochs"],
                "acc": record["metrics"]["acc"],
                "asr": record["metrics"]["asr"],
                "scan_seconds": report.seconds,
                "norm_family": report.config["norm_family"],
                "scan_options": asdict(opts),
                "confusions": report.config["confusions"],
                "statistics": report.config["statistics"],
            }
            stored[key] = row
            results_file.write_text(json.dumps(stored, indent=1))
            rows.append(row)
            s = row["statistics"]
            print(
                f"{key}: acc {row['acc']:.3f} asr {row['asr'] if row['asr'] is None else round(row['asr'], 3)} "
                f"a2o {s['all_to_one']:.3f} (target {s['target']}) a2a {s['all_to_all']:.3f} "
                f"[{report.seconds:.0f}s]",
                flush=True,
            )
    if args.rescore:
        rescore(rows)
        for row in rows:
            stored[row["key"]] = row
        results_file.write_text(json.dumps(stored, indent=1))
    for extra in args.include:
        included = []
        for r in json.loads(Path(extra).read_text()).values():
            if "norm_family" not in r:  # rows stored before the scan recorded its family
                r["norm_family"] = family_of(r["model"], r["model_kwargs"])
            if r["scan_options"] in [asdict(opts) for opts in candidates[r["norm_family"]]]:
                included.append(r)
        if args.rescore:
            rescore(included)
        print(f"included {len(included)} models from {extra}")
        rows.extend(included)
    for r in rows:  # rows stored before the scan recorded its family, or its data
        if "norm_family" not in r:
            r["norm_family"] = family_of(r["model"], r["model_kwargs"])
        r.setdefault("data", args.data)
    rows, options, selection = choose_budgets(rows, candidates, options, args)
    summarise(rows, args, argv, options, selection)


def split_rows(rows: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict]]:
    """(used, failed, untrained): models that learned the task and, if attacked, carry the
    backdoor; backdoors that did not implant; models that did not learn the task."""
    untrained = [r for r in rows if r["acc"] < args.min_acc]
    used = [
        r for r in rows if r not in untrained and (r["attack"] is None or (r["asr"] or 0) >= args.min_asr)
    ]
    failed = [r for r in rows if r not in used and r not in untrained]
    return used, failed, untrained


def flagged(statistics: dict, cut: float, a2a_cut: float | None) -> bool:
    """The verdict the scan gives at these thresholds: backdoored when either score is above
    its cut (no all-to-all cut: the all-to-one score alone)."""
    return statistics["all_to_one"] > cut or (a2a_cut is not None and statistics["all_to_all"] > a2a_cut)


def model_id(row: dict) -> str:
    """A result's key without its budget: the same model scanned the same way at another eps."""
    return "|".join(part for part in row["key"].split("|") if not part.startswith("eps="))


def family_errors(rows: list[dict]) -> dict:
    """Thresholds fitted on one family's models alone (as :func:`choose_threshold` fits them) and
    the detection errors they leave there: clean models flagged, backdoors missed."""
    clean = [r for r in rows if r["attack"] is None]
    one = [r for r in rows if r["mode"] == "all-to-one"]
    allall = [r for r in rows if r["mode"] == "all-to-all"]
    a2o = choose_threshold(
        [r["statistics"]["all_to_one"] for r in clean], [r["statistics"]["all_to_one"] for r in one]
    )
    a2a = (
        choose_threshold(
            [r["statistics"]["all_to_all"] for r in clean + one],
            [r["statistics"]["all_to_all"] for r in allall],
        )["threshold"]
        if allall
        else None
    )
    false_pos = sum(flagged(r["statistics"], a2o["threshold"], a2a) for r in clean)
    missed = sum(not flagged(r["statistics"], a2o["threshold"], a2a) for r in one + allall)
    return {
        "clean_models": len(clean),
        "backdoored_models": len(one) + len(allall),
        "false_positives": false_pos,
        "missed": missed,
        "errors": false_pos + missed,
        "all_to_one_threshold": a2o["threshold"],
        "all_to_one_margin": a2o["margin"],
    }


def choose_budgets(
    rows: list[dict],
    candidates: dict[str, list[ScanOptions]],
    options: dict[str, ScanOptions],
    args: argparse.Namespace,
) -> tuple[list[dict], dict[str, ScanOptions], dict[str, dict]]:
    """Per family with several candidate budgets, the budget the calibration ships: the one
    whose thresholds, fitted on that family's models alone, make the fewest errors on them
    (ties: fewer false positives, then the wider all-to-one margin, then the smaller budget,
    the paper's side). Only models scanned at every candidate are compared, so each budget
    is judged on the same models. Returns the rows at the chosen budgets, the options with
    each family's choice, and the comparison (recorded as ``eps_selection``)."""
    used = {id(r) for r in split_rows(rows, args)[0]}
    chosen = dict(options)
    selection: dict[str, dict] = {}
    kept: set[int] = set()
    for family, opts_list in candidates.items():
        mine = [r for r in rows if r["norm_family"] == family]
        if len(opts_list) == 1 or not mine:
            chosen[family] = opts_list[0]
            kept |= {id(r) for r in mine}
            continue
        at = {opts.eps: [r for r in mine if r["scan_options"] == asdict(opts)] for opts in opts_list}
        common = set.intersection(*({model_id(r) for r in group} for group in at.values()))
        fits = {
            eps: family_errors([r for r in group if id(r) in used and model_id(r) in common])
            for eps, group in at.items()
        }
        best = min(
            opts_list,
            key=lambda o: (
                fits[o.eps]["errors"],
                fits[o.eps]["false_positives"],
                -fits[o.eps]["all_to_one_margin"],
                o.eps,
            ),
        )
        chosen[family] = best
        kept |= {id(r) for r in at[best.eps]}
        selection[family] = {
            "candidates": {str(eps): fit for eps, fit in fits.items()},
            "chosen": best.eps,
            "compared_models": len(common),
            "skipped_models": len({model_id(r) for r in mine} - common),
        }
        print(
            f"budget for {family}: eps {best.eps} of {sorted(fits)}; "
            + "; ".join(
                f"eps {eps}: {fit['errors']} errors ({fit['false_positives']} clean flagged, {fit['missed']} missed)"
                for eps, fit in fits.items()
            )
        )
    return [r for r in rows if id(r) in kept], chosen, selection


def summarise(
    rows: list[dict],
    args: argparse.Namespace,
    argv: list[str] | None,
    options: dict[str, ScanOptions],
    selection: dict[str, dict],
) -> None:
    implanted, failed, untrained = split_rows(rows, args)
    clean = [r for r in implanted if r["attack"] is None]
    one = [r for r in implanted if r["mode"] == "all-to-one"]
    allall = [r for r in implanted if r["mode"] == "all-to-all"]
    a2o = choose_threshold(
        [r["statistics"]["all_to_one"] for r in clean], [r["statistics"]["all_to_one"] for r in one]
    )
    # one all-to-one threshold per normalisation family (see timm_purify.detection.ban.norm_family)
    by_family = {
        fam: choose_threshold(
            [r["statistics"]["all_to_one"] for r in clean if r["norm_family"] == fam],
            [r["statistics"]["all_to_one"] for r in one if r["norm_family"] == fam],
        )
        for fam in sorted({r["norm_family"] for r in clean + one})
    }
    a2a_neg = [r["statistics"]["all_to_all"] for r in clean + one]
    a2a = (
        choose_threshold(a2a_neg, [r["statistics"]["all_to_all"] for r in allall])
        if allall
        else {"threshold": None, "separable": None, "margin": None, "errors": None}
    )
    sources = choose_target_sources(one)
    for r in implanted:
        s = r["statistics"]
        cut = by_family[r["norm_family"]]["threshold"]
        r["detected"] = flagged(s, cut, a2a["threshold"])
        r["target_found"] = (
            None
            if r["target"] is None
            else bool(s["all_to_one"] > cut and reported_target(r, sources) == r["target"])
        )
    print("\nmodel                                          acc    asr    a2o    tgt  a2a    verdict")
    for r in rows:
        s = r["statistics"]
        asr = "  -  " if r["asr"] is None else f"{r['asr']:.3f}"
        flag = (
            "excluded (backdoor did not implant)"
            if r in failed
            else "excluded (did not learn the task)"
            if r in untrained
            else ("backdoored" if r.get("detected") else "clean")
        )
        print(
            f"{r['key'].split('|')[0]:46s} {r['acc']:.3f}  {asr}  {s['all_to_one']:.3f}  {s['target']}/{r['target']}  "
            f"{s['all_to_all']:.3f}  {flag}"
        )
    print(
        f"\nall-to-one threshold: {a2o} (all families)\nper family: {by_family}\nall-to-all threshold: {a2a}"
        f"\ntarget source per family: {sources}"
    )
    correct = sum(r["detected"] == (r["attack"] is not None) for r in implanted)
    print(f"detection accuracy on the calibration set: {correct}/{len(implanted)}")
    reliability = family_reliability(implanted)
    for fam, rel in reliability.items():
        print(f"  {fam}: {rel}")
    if args.no_write:
        return
    if a2a["threshold"] is None:
        raise SystemExit("no all-to-all model in the set: add e.g. badnets@mode=all-to-all to --attacks")
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    arch_list = sorted({r["arch"] for r in implanted})
    epoch_list = "/".join(str(e) for e in sorted({r["epochs"] for r in implanted}))
    size_list = "/".join(str(n) for n in sorted({r["train_size"] for r in implanted}))
    data_list = sorted({r["data"] for r in implanted})
    false_pos = sum(r["detected"] for r in clean)
    missed = [r for r in one + allall if not r["detected"]]
    wrong_target = [r for r in one if r["detected"] and not r["target_found"]]
    record = {
        "threshold": a2o["threshold"],
        "all_to_one_thresholds": {fam: fit["threshold"] for fam, fit in by_family.items()},
        "all_to_all_threshold": a2a["threshold"],
        "target_source_by_family": {fam: fit["source"] for fam, fit in sources.items()},
        "target_source_fit": sources,
        "summary": (
            f"{len(clean)} clean + {len(one) + len(allall)} backdoored models "
            f"({', '.join(arch_list)}; {epoch_list} epochs on {size_list} images of {' / '.join(data_list)}), "
            f"calibrated {datetime.date.today().isoformat()}"
        ),
        "rule": (
            "each threshold lies midway between the highest score of a negative model and the lowest "
            "score of a positive one when they separate, else at the cut with the fewest errors. "
            "all-to-one: negatives = clean models, positives = all-to-one backdoors, one threshold per "
            "normalisation family (all_to_one_thresholds; 'threshold' pools the families and is the "
            "fallback). all-to-all: "
            "negatives = clean and all-to-one models, positives = all-to-all backdoors. The suspected "
            "target comes, per family, from the predictions (noisy, or noisy with the negative mask) "
            "that named the true target of more all-to-one backdoors (target_source_fit). Where several "
            "noise budgets were offered, each family scans at the one whose thresholds, fitted on that "
            "family's models alone, made the fewest errors there (eps_selection). Backdoors "
            f"whose ASR stayed below {args.min_asr} did not implant, and models whose clean accuracy "
            f"stayed below {args.min_acc} did not learn the task: both are listed but not used."
        ),
        "reliability_by_family": reliability,
        "min_asr": args.min_asr,
        "min_acc": args.min_acc,
        "all_to_one_fit": a2o,
        "all_to_one_fit_by_family": by_family,
        "all_to_all_fit": a2a,
        "detection_accuracy": f"{correct}/{len(implanted)}",
        "false_positives": f"{false_pos}/{len(clean)} clean models",
        "missed": f"{len(missed)}/{len(one) + len(allall)} backdoored models",
        "wrong_target": f"{len(wrong_target)} of the detected all-to-one backdoors",
        # the noise budget each family's threshold was fitted at: the scan's default for that family
        "eps_by_family": {fam: options_for(options, fam).eps for fam in sorted(by_family)},
        # how it was chosen where --eps-candidates offered several (see choose_budgets)
        "eps_selection": selection,
        "scan": {
            "options": {k: v for k, v in asdict(options[""]).items() if "threshold" not in k},
            "options_by_family": {fam: non_default(options_for(options, fam)) for fam in sorted(by_family)},
            "data": ", ".join(f"{d}:{args.scan_split}" for d in data_list),
            "clean_count": args.clean_count,
            "seed": args.scan_seed,
        },
        "date": datetime.date.today().isoformat(),
        "timm_purify_version": __version__,
        "command": command,
        "environment": environment_info(),
        "models": [
            {
                k: r.get(k)
                for k in (
                    "arch",
                    "model",
                    "model_kwargs",
                    "attack",
                    "mode",
                    "target",
                    "seed",
                    "data",
                    "train_size",
                    "epochs",
                    "acc",
                    "asr",
                    "scan_seconds",
                    "norm_family",
                    "detected",
                    "target_found",
                )
            }
            | {
                "all_to_one": r["statistics"]["all_to_one"],
                # what the scan reports: the family's target source (see choose_target_sources)
                "suspected_target": reported_target(r, sources),
                "target_noisy": r["statistics"]["target"],
                "target_noisy_masked": r["statistics"]["target_masked"],
                "all_to_all": r["statistics"]["all_to_all"],
                "used": r in implanted,
            }
            for r in rows
        ],
    }
    out = Path(args.out)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
