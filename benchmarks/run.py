"""Benchmark harness: build (and cache) a zoo of backdoored and clean models, run defences and
the detector over it, and write JSON results plus the Markdown table in ``RESULTS.md``.

Usage::

    python benchmarks/run.py --suite quick                       # no-defence numbers, mini data
    python benchmarks/run.py --suite quick --methods npd,nft,awm,ft
    python benchmarks/run.py --suite full --archs resnet18 --methods npd --detect
    python benchmarks/run.py --render                            # rebuild RESULTS.md from results/*.json

Every row records the machine, library versions and seeds. Models are cached under
``benchmarks/cache/`` (ignored by git) keyed by everything that shapes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also when imported by a test
from calibrate_reach import spread_cuts, spread_fired  # noqa: E402

from timm_purify._train import TrainConfig, build_backdoored_model, environment_info
from timm_purify.attacks import build_attack, from_json
from timm_purify.data import clean_subset, load_data
from timm_purify.metrics import der, evaluate

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
# below this no-defence ASR a backdoor did not implant (the calibration scripts' --min-asr default)
MIN_ASR = 0.5


@dataclass(frozen=True)
class Recipe:
    """How one architecture is trained from scratch at 32x32."""

    arch: str
    lr: float
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    model_kwargs: tuple[tuple[str, object], ...] = ()


RECIPES = {
    "resnet18": Recipe("resnet18", lr=0.05),
    "convnext_atto": Recipe("convnext_atto", lr=2e-3, optimizer="adamw", weight_decay=0.05),
    "vit_tiny": Recipe(
        "vit_tiny_patch16_224",
        lr=1e-3,
        optimizer="adamw",
        weight_decay=0.05,
        model_kwargs=(("patch_size", 4),),
    ),
    # SGD 0.05 reached 34% after 3 epochs on 2,000 images where AdamW reached 52% (calibrate_scan)
    "efficientnet_b0": Recipe("efficientnet_b0", lr=2e-3, optimizer="adamw", weight_decay=0.05),
}

# attack key -> (attack name, extra build_attack kwargs)
ATTACKS = {
    "badnets": ("badnets", {}),
    "blended": ("blended", {}),
    "sig": ("sig", {}),
    "wanet": ("wanet", {}),
    "badnets-a2a": ("badnets", {"mode": "all-to-all"}),
}


@dataclass(frozen=True)
class Suite:
    data: str
    archs: tuple[str, ...]
    attacks: tuple[str, ...]
    epochs: int
    clean_fraction: float
    poison_rate: float = 0.1
    train_size: int | None = None
    # the scan's clean set: the detection issue times one scan on 1% of the training data
    scan_fraction: float = 0.01


SUITES = {
    "quick": Suite(
        "fashion-mnist-mini",
        ("resnet18",),
        ("badnets", "blended", "sig", "wanet"),
        epochs=5,
        clean_fraction=0.05,
    ),
    "full": Suite(
        "fashion-mnist",
        ("resnet18", "convnext_atto", "vit_tiny", "efficientnet_b0"),
        ("badnets", "blended", "sig", "wanet", "badnets-a2a"),
        epochs=3,
        clean_fraction=0.05,
    ),
}


def model_dir(cache: Path, suite: Suite, arch: str, attack: str | None, seed: int) -> Path:
    tag = attack or "clean"
    size = f"-n{suite.train_size}" if suite.train_size else ""
    batch = TrainConfig().batch_size
    return cache / f"{suite.data}{size}-{arch}-{tag}-p{suite.poison_rate}-e{suite.epochs}-b{batch}-s{seed}"


def get_model(cache: Path, suite: Suite, arch: str, attack_key: str | None, seed: int, quiet: bool) -> Path:
    """Build the model once; later runs reuse the cached folder."""
    path = model_dir(cache, suite, arch, attack_key, seed)
    if (path / "model.safetensors").is_file():
        return path
    recipe = RECIPES[arch]
    attack = None
    if attack_key is not None:
        name, extra = ATTACKS[attack_key]
        attack = build_attack(name, num_classes=10, poison_rate=suite.poison_rate, seed=seed, **extra)
    config = TrainConfig(
        epochs=suite.epochs,
        lr=recipe.lr,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        seed=seed,
    )
    print(f"[build] {path.name}", flush=True)
    try:
        build_backdoored_model(
            model=recipe.arch,
            data=suite.data,
            attack=attack,
            out_dir=path,
            config=config,
            train_size=suite.train_size,
            model_kwargs=dict(recipe.model_kwargs),
            quiet=quiet,
        )
    except FileExistsError:
        # a job beside this one built the same (seeded) model first; folders are written
        # atomically, so a finished one is complete and this job uses it
        if not (path / "model.safetensors").is_file():
            raise
        print(f"[build] {path.name}: built meanwhile by another job, using that", flush=True)
    return path


def ft_epoch_seconds(model, clean, seed: int) -> float:
    """Wall seconds of one epoch of plain fine-tuning over ``clean`` (the runtime yardstick)."""
    from timm_purify.defenses import purify

    return purify(model, clean, method="ft", epochs=1, seed=seed, quiet=True).seconds


def run(args: argparse.Namespace) -> Path:
    suite = SUITES[args.suite]
    if args.archs:
        suite = Suite(**{**suite.__dict__, "archs": tuple(args.archs.split(","))})
    if args.attacks:
        # "none": no backdoored model, only the clean models of --detect
        attacks = () if args.attacks == "none" else tuple(args.attacks.split(","))
        suite = Suite(**{**suite.__dict__, "attacks": attacks})
    if args.train_size:
        suite = Suite(**{**suite.__dict__, "train_size": args.train_size})
    if args.epochs:
        suite = Suite(**{**suite.__dict__, "epochs": args.epochs})
    methods = [m for m in args.methods.split(",") if m] if args.methods else []
    options = json.loads(args.options) if args.options else {}
    cache = Path(args.cache)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS_DIR / f"{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    rows = _RowLog(out, {"suite": args.suite, "suite_config": suite.__dict__})
    env = environment_info()
    for arch in suite.archs:
        for attack_key in suite.attacks:
            path = get_model(cache, suite, arch, attack_key, args.seed, args.quiet)
            model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
            attack = from_json(path / "attack.json")
            test = load_data(suite.data, split="test", model=model)
            train = load_data(suite.data, split="train", model=model)
            fraction = None if args.clean_count else suite.clean_fraction
            defender_seed = args.seed if args.defender_seed is None else args.defender_seed
            clean = clean_subset(train, count=args.clean_count, fraction=fraction, seed=defender_seed)
            before = evaluate(model, test, attack=attack)
            base = {
                "suite": args.suite,
                "arch": arch,
                "attack": attack_key,
                "model": path.name,
                "seed": args.seed,
                "defender_seed": defender_seed,
                "num_clean": len(clean),
                "environment": env,
            }
            rows.append({**base, "method": "none", **_metrics(before), "der": None, "seconds": 0.0})
            print(f"[eval] {arch} {attack_key} none: {before}", flush=True)
            if args.detect:  # before the methods: a run cut short keeps its scan
                rows.append(
                    {**base, **_scan_row(model, train, suite, args.seed, backdoored=True, target=attack)}
                )
            yardstick = ft_epoch_seconds(model, clean, defender_seed) if methods else None
            for method in methods:
                from timm_purify.defenses import purify

                opts = dict(options.get(method, {}))
                # a method run with non-default options is its own row, labelled with them
                label = method + "".join(f" {k}={v}" for k, v in opts.items())
                if args.clean_count:
                    label += f" [{args.clean_count} clean images]"
                if args.defender_seed is not None:
                    label += f" [defender seed {args.defender_seed}]"
                if method in ("npd-tp", "npd-tu") and attack.mode == "all-to-one":
                    opts.setdefault("target", attack.target)
                start = time.perf_counter()
                try:
                    result = purify(model, clean, method=method, seed=defender_seed, quiet=args.quiet, **opts)
                except Exception as err:  # a failing method is a result to report, not a crash
                    rows.append({**base, "method": label, "error": f"{type(err).__name__}: {err}"})
                    print(f"[fail] {arch} {attack_key} {method}: {err}", flush=True)
                    continue
                after = evaluate(result.model, test, attack=attack)
                rows.append(
                    {
                        **base,
                        "method": label,
                        **_metrics(after),
                        "der": der(before, after),
                        "seconds": result.seconds,
                        "total_seconds": time.perf_counter() - start,
                        "ft_epoch_seconds": yardstick,
                        "ratio_to_ft_epoch": result.seconds / yardstick if yardstick else None,
                        "config": result.config,
                    }
                )
                print(
                    f"[eval] {arch} {attack_key} {label}: {after} DER {der(before, after):.3f} ({result.seconds:.0f}s)",
                    flush=True,
                )
        if args.detect:
            for seed in range(args.first_clean_seed, args.first_clean_seed + args.clean_seeds):
                path = get_model(cache, suite, arch, None, seed, args.quiet)
                model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
                train = load_data(suite.data, split="train", model=model)
                rows.append(
                    {
                        "suite": args.suite,
                        "arch": arch,
                        "attack": "clean",
                        "model": path.name,
                        "seed": seed,
                        "environment": env,
                        **_scan_row(model, train, suite, seed, backdoored=False, target=None),
                    }
                )
    print(f"wrote {out}")
    return out


class _RowLog(list):
    """The run's rows, rewritten to ``out`` after every row: an interrupted run (hours of CPU)
    keeps every row it measured."""

    def __init__(self, out: Path, header: dict) -> None:
        super().__init__()
        self.out, self.header = out, header

    def append(self, row: dict) -> None:
        # when the row was measured: RESULTS.md shows the newest row per key (see render)
        super().append({**row, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.out.write_text(json.dumps({**self.header, "rows": list(self)}, indent=2, default=str))


def _metrics(r) -> dict:
    return {"acc": r.acc, "asr": r.asr, "ra": r.ra, "n_test": r.n_clean, "n_triggered": r.n_triggered}


def _scan_row(model, train, suite: Suite, seed: int, *, backdoored: bool, target) -> dict:
    """Scan ``model`` on the suite's share of ``train`` and time one FT epoch over the same images."""
    from timm_purify.detection import scan

    clean = clean_subset(train, fraction=suite.scan_fraction, seed=seed)
    report = scan(model, clean, seed=seed, quiet=True)
    yardstick = ft_epoch_seconds(model, clean, seed)
    truth = getattr(target, "target", None) if target is not None and target.mode == "all-to-one" else None
    return {
        "method": "scan",
        "eps": report.config["eps"],
        "truth": "backdoored" if backdoored else "clean",
        "verdict": report.verdict,
        "score": report.score,
        "threshold": report.threshold,
        "suspected_target": report.suspected_target,
        "true_target": truth,
        "pattern": report.pattern,
        # whether BAN's all-to-one verdict needed its two readings to agree, or a higher cut where
        # they did not (see _shipped_cuts)
        "all_to_one_agreement": report.config.get("all_to_one_agreement", False),
        "all_to_one_split_threshold": report.config.get("all_to_one_split_threshold"),
        # which stage decided, and each later stage's own reading where it ran (a clean verdict's
        # score is BAN's; these say how near the reach and spread stages came)
        "decided_by": report.config.get("decided_by"),
        "reach_score": report.reach["score"] if report.reach else None,
        "spread_score": report.spread["score"] if report.spread else None,
        "spread_shape": report.spread["shape"] if report.spread else None,
        "num_clean": len(clean),
        "seconds": report.seconds,
        "ft_epoch_seconds": yardstick,
        "ratio_to_ft_epoch": report.seconds / yardstick,
    }


def _spread_counted(fit: dict) -> str | None:
    """The spread readings a reach refit counted last, as text (``None``: none): ``spread``, the
    readings' settings, or ``spread_threshold``, one cut, as refits before several readings wrote it."""
    if fit.get("spread"):
        return spread_cuts(fit["spread"])
    return None if fit.get("spread_threshold") is None else f"{fit['spread_threshold']:.3f}"


def _spread_fires(model: dict, fit: dict) -> bool:
    """Whether the spread readings a reach refit counted fire on one of its models (a model without
    a score, as a backdoor that did not implant, which the refit does not use: no)."""
    if fit.get("spread"):
        return "spread_scores" in model and spread_fired(model["spread_scores"], fit["spread"])
    score, cut = model.get("spread_score"), fit.get("spread_threshold")
    return score is not None and cut is not None and score > cut


def _cut(value: float | None) -> str:
    """A threshold, or "not used" where the calibration left a statistic out for a family."""
    return "not used" if value is None else f"{value:.3f}"


def _shipped_cuts() -> dict[float, list[tuple[float, bool, float | None]]]:
    """Per noise budget, the thresholds the shipped calibration decides a verdict with for the
    family scanned at that budget (BAN's, reach's, spread's), each with whether that family's BAN
    verdict needs its two readings to agree and its split cut, to tell a scan row taken with it
    from one taken with an earlier calibration (a row recorded before the condition or the split
    cut existed had neither)."""
    from timm_purify.detection import load_calibration
    from timm_purify.detection.ban import calibrated_decision, spread_entries

    cal = load_calibration()
    out: dict[float, list[tuple[float, bool, float | None]]] = {}
    for fam, eps in cal.get("eps_by_family", {}).items():
        decision = calibrated_decision(cal, fam)
        cuts = [decision["threshold"], decision["all_to_all_threshold"]]
        cuts.append(((cal.get("reach") or {}).get("by_family", {}).get(fam) or {}).get("threshold"))
        # every spread reading's cut (a family may run several)
        cuts += [
            e.get("threshold")
            for e in spread_entries((cal.get("spread") or {}).get("by_family", {}).get(fam))
        ]
        out.setdefault(float(eps), []).extend(
            (c, decision["agreement"], decision["split_threshold"]) for c in cuts if c is not None
        )
    return out


def _calibration_section() -> list[str]:
    """The scan's calibration zoo (``timm_purify/detection/calibration.json``, written by
    ``benchmarks/calibrate_scan.py``): its detection accuracy and every model's score."""
    from timm_purify.detection import load_calibration

    cal = load_calibration()
    cuts = cal.get("all_to_one_thresholds", {})
    by_family = cal["scan"].get("options_by_family", {})
    selection = cal.get("eps_selection", {})
    if selection:  # the zoo is scanned once per candidate budget
        budgets = sorted({float(eps) for fit in selection.values() for eps in fit["candidates"]})
        zoo_env = f'SCAN_OPTIONS="eps=E" (E = {", ".join(f"{e:g}" for e in budgets)}) '
    else:
        family_options = " ".join(
            f"{fam}:{k}={v}" for fam, opts in by_family.items() for k, v in opts.items()
        )
        zoo_env = f'SCAN_OPTIONS="{family_options}" ' if family_options else ""
    lines = [
        "## Detection: the scan's calibration zoo",
        "",
        f"From `timm_purify/detection/calibration.json` ({cal['summary']}); regenerate with "
        f"`{cal['command']}` (the included zoo files are written by `{zoo_env}bash benchmarks/scan_zoo.sh`).",
        "",
        f"Detection accuracy {cal['detection_accuracy']}; false positives {cal['false_positives']}; "
        f"missed {cal['missed']}; wrong target: {cal['wrong_target']}. All-to-one thresholds per "
        f"normalisation family: {', '.join(f'{k} {v:.3f}' for k, v in cuts.items())}; all-to-all "
        f"threshold {cal['all_to_all_threshold']:.3f}"
        + "".join(f" ({fam}: {_cut(cut)})" for fam, cut in cal.get("all_to_all_thresholds", {}).items())
        + f". Scan options: {cal['scan']['options']}"
        + "".join(f"; for the {fam} family {opts}" for fam, opts in by_family.items() if opts)
        + f"; {cal['scan']['clean_count']} clean images from {cal['scan']['data']}.",
        "",
        "Per normalisation family (what each scan report quotes as `calibration_reliability`, and "
        "what `timm-purify scan` cautions about when a family shows misses, false alarms or wrong targets):",
        "",
        "| family | architectures | clean models flagged | backdoored models detected "
        "| all-to-one targets correct |",
        "|---|---|---|---|---|",
        *(
            f"| {fam} | {', '.join(r['archs'])} | {r['false_positives']}/{r['clean_models']} | "
            f"{r['detected']}/{r['backdoored_models']} | {r['targets_correct']}/{r['all_to_one_models']} |"
            for fam, r in cal.get("reliability_by_family", {}).items()
        ),
        "",
        *(
            f"The {fam} family's cuts and record above were refitted together with the reach stage by "
            f"`calibrate_reach.py --refit-ban {fam}` on its own scans (universal-reach section, below); the "
            "accuracy line above and the per-model verdicts below are calibrate_scan.py's fit at its earlier cuts."
            for fam in cal.get("refitted_by_family", {})
        ),
        *([""] if cal.get("refitted_by_family") else []),
        *_budget_lines(selection),
        "| model | training | attack | seed | ACC | ASR | family | all-to-one score | suspected / true target "
        "| all-to-all score | verdict | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in cal["models"]:
        attack = "clean" if m["attack"] is None else f"{m['attack']} {m['mode']}"
        if not m["used"]:
            learned = m["acc"] >= cal.get("min_acc", 0.0)
            verdict = "not used (" + ("did not implant" if learned else "did not learn the task") + ")"
        else:
            verdict = "backdoored" if m["detected"] else "clean"
        lines.append(
            f"| {m['arch']} | {m['epochs']} epochs x {m['train_size']} | {attack} | {m['seed']} | {_pct(m['acc'])} | {_pct(m['asr'])} | "
            f"{m.get('norm_family', '-')} | {m['all_to_one']:.3f} | {m['suspected_target']} / {m['target']} | "
            f"{m['all_to_all']:.3f} | {verdict} | {m['scan_seconds']:.1f} |"
        )
    return lines + [""]


def _budget_lines(selection: dict[str, dict]) -> list[str]:
    """How calibrate_scan chose each family's noise budget among its candidates (empty when
    no family was offered several)."""
    if not selection:
        return []
    lines = [
        "Noise budget per family, chosen by `calibrate_scan.py --eps-candidates`: every model of the "
        "family scanned at each budget, thresholds fitted on that family's models alone, fewest "
        "errors wins (ties: fewer clean models flagged, wider all-to-one margin, smaller budget):",
        "",
        "| family | eps | models compared | clean models flagged | backdoored models missed | errors "
        "| all-to-one threshold | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, fit in selection.items():
        for eps, row in fit["candidates"].items():
            lines.append(
                f"| {fam} | {eps} | {row['clean_models']} + {row['backdoored_models']} | "
                f"{row['false_positives']}/{row['clean_models']} | {row['missed']}/{row['backdoored_models']} | "
                f"{row['errors']} | {row['all_to_one_threshold']:.3f} | {'yes' if float(eps) == fit['chosen'] else ''} |"
            )
    return lines + [""]


def _reach_section() -> list[str]:
    """The scan's second stage (the ``reach`` section of ``calibration.json``, written by
    ``benchmarks/calibrate_reach.py``): where it runs, both stages' record against BAN's alone,
    and every model's reach score at each candidate budget."""
    from timm_purify.detection import load_calibration
    from timm_purify.detection.ban import calibrated_decision, decide

    calibration = load_calibration()
    section = calibration.get("reach")
    if not section:
        return []
    # each family's fit names the run behind it (a run over one family's models keeps the others)
    runs: dict[str, list[str]] = {}
    replaced: dict[str, list[str]] = {}  # families a run fitted that a later run refitted
    for fam, run_ in (section.get("provenance_by_family") or {}).items():
        command = f"`{run_['command']}` ({run_['date']})"
        runs.setdefault(command, []).append(fam)
        replaced[command] = [f for f in run_.get("fitted_families", []) if f not in runs[command]]
    parts = [
        (f"{', '.join(fams)} with " if len(runs) > 1 else "with ")
        + command
        + (
            f", given only its {', '.join(fams)} models (its {', '.join(replaced[command])} fit was replaced since)"
            if replaced[command]
            else ""
        )
        for command, fams in runs.items()
    ]
    regenerate = "regenerate " + ("; ".join(parts) if parts else f"with `{section['command']}`")
    lines = [
        "## Detection: the universal-reach stage",
        "",
        f"From the `reach` section of `timm_purify/detection/calibration.json` ({section['date']}); "
        f"{regenerate}. Rule: {section['rule']}",
        "",
        "| family | enabled | budget | threshold | target where both fire | errors, both stages / BAN alone "
        "| clean flagged | backdoors detected (BAN alone) | right targets (BAN alone) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, fit in section["families"].items():
        best = fit.get("chosen")
        if best is None:
            lines.append(f"| {fam} | no | - | - | - | - | - | - | - |")
            continue
        both, alone = best["reliability"], best["reliability_ban_alone"]
        # a refit that found reach no help keeps BAN's cuts and no reach cut
        reach = f"{best['fit']['threshold']:.3f} | {best['target_when_both']}" if best["fit"] else "- | -"
        # a family refitted with the spread reading counts it in every column but BAN alone's
        label = fam if _spread_counted(fit) is None else f"{fam} (with spread)"
        lines.append(
            f"| {label} | {'yes' if fit['enabled'] else 'no'} | {best['norm']} {best['rho']:g} | "
            f"{reach} | {best['errors']} / {best['errors_ban_alone']} | "
            f"{both['false_positives']}/{both['clean_models']} | {both['detected']}/{both['backdoored_models']} "
            f"({alone['detected']}) | {both['targets_correct']}/{both['all_to_one_models']} ({alone['targets_correct']}) |"
        )
    for fam in section.get("ban_refitted", []):
        fit = section["families"][fam]
        before, best = fit["before_refit"], fit["chosen"]
        lines += [
            "",
            f"BAN's {fam} noise budget and cuts refitted with the stage (`--refit-ban {fam}`): eps "
            f"{before['eps']:g} -> {best['eps']:g}, all-to-one "
            f"{_cut(before['all_to_one_threshold'])} -> {_cut(best['all_to_one_threshold'])}, all-to-all "
            f"{_cut(before['all_to_all_threshold'])} -> {_cut(best['all_to_all_threshold'])}; errors of both stages "
            f"{'not counted' if before['errors'] is None else before['errors']} -> {best['errors']} "
            "(the best BAN cuts without reach"
            + ("" if _spread_counted(fit) is None else ", spread counted")
            + f": {best['errors_best_ban_alone']})"
            + (
                ""
                if _spread_counted(fit) is None
                else f"; every count here includes the spread reading at {_spread_counted(fit)}, counted last"
            )
            + ".",
            "",
            "| eps | all-to-one cut | all-to-all cut | reach cut | clean flagged | backdoors detected "
            "| right targets | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for eps, at in fit["by_eps"].items():
            rel = at["reliability"]
            lines.append(
                f"| {eps} | {_cut(at['all_to_one_threshold'])} | {_cut(at['all_to_all_threshold'])} | "
                f"{_cut(at['reach_threshold'])} | {rel['false_positives']}/{rel['clean_models']} | "
                f"{rel['detected']}/{rel['backdoored_models']} | {rel['targets_correct']}/{rel['all_to_one_models']} | "
                f"{at['errors']} |"
            )
    budgets = sorted({(m["reach_norm"], m["reach_rho"]) for m in section["models"]})
    lines += [
        "",
        "| model | attack | ACC | ASR | before reach (BAN; spread where calibrated): verdict (target), as "
        "scanned or, for a refitted family, at its shipped cuts | BAN all-to-one / all-to-all score (eps) | "
        + " | ".join(f"reach {n} {r:g}: score (class)" for n, r in budgets)
        + " | true target | used |",
        "|---|---|---|---|---|---|" + "---|" * len(budgets) + "---|---|",
    ]
    by_model: dict[str, dict] = {}
    for m in section["models"]:
        by_model.setdefault(m["model"], {})[(m["reach_norm"], m["reach_rho"])] = m
    for name, rows in sorted(by_model.items()):
        m = next(iter(rows.values()))
        attack = "clean" if m["attack"] is None else f"{m['attack']} {m['mode']}"
        verdict, target = m["ban_verdict"], m["ban_target"]
        stats = m.get("ban_statistics")
        if m["norm_family"] in section.get("ban_refitted", []):
            verdict, _, target, _, _ = decide(stats, **calibrated_decision(calibration, m["norm_family"]))
            # the refit reads spread on the models it uses only (a backdoor that did not implant has none)
            if verdict == "clean" and _spread_fires(m, section["families"][m["norm_family"]]):
                verdict = "backdoored (spread)"
        ban = verdict + ("" if target is None else f" ({target})")
        ban_scores = (
            "-"
            if stats is None
            else f"{stats['all_to_one']:.3f} / {stats['all_to_all']:.3f} (eps {m['ban_eps']:g})"
        )
        scores = " | ".join(
            f"{rows[b]['reach_score']:.3f} ({rows[b]['reach_target']})" if b in rows else "-" for b in budgets
        )
        lines.append(
            f"| {name} | {attack} | {_pct(m['acc'])} | {_pct(m['asr'])} | {ban} | {ban_scores} | {scores} | "
            f"{'-' if m['target'] is None else m['target']} | {'yes' if m['used'] else 'no'} |"
        )
    return lines + [""]


def _spread_section() -> list[str]:
    """The scan's all-to-all reading (the ``spread`` section of ``calibration.json``, written by
    ``benchmarks/calibrate_spread.py``): where it runs and in which shape, the record of all
    stages against the earlier ones, and every model's spread score."""
    from calibrate_spread import budget_label, budget_of

    from timm_purify.detection import load_calibration

    section = load_calibration().get("spread")
    if not section:
        return []
    lines = [
        "## Detection: the spread reading (all-to-all)",
        "",
        "From the `spread` section of `timm_purify/detection/calibration.json`; regenerate "
        + "; ".join(
            f"{fam} with `{run['command']}` ({run['date']})"
            for fam, run in (
                section.get("provenance_by_family")
                or {fam: section for fam in section["families"]}  # written before per-family runs
            ).items()
        )
        + f". Rule: {section['rule']}",
        "",
        "| family | enabled | budget | threshold | errors, all stages / without spread | clean flagged "
        "| backdoors detected (without) | right targets (without) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    earlier = []
    # a family's readings in the order the scan runs them: a fit run beside earlier ones
    # (--alongside) keeps theirs under "alongside"; one declined beside them is kept under
    # "declined", listed after them
    fits = [
        (fam, label, f)
        for fam, fit in section["families"].items()
        for label, f in (
            [(f"{fam} (first)", fit["alongside"]), (f"{fam} (then)", fit)]
            if fit.get("alongside")
            else [(fam, fit)]
        )
        + [(f"{fam} (tried beside it)", d) for d in fit.get("declined", [])]
    ]
    for fam, label, fit in fits:
        earlier += [(fam, e) for e in fit.get("earlier", [])]
        best = fit.get("chosen")
        if best is None:
            lines.append(f"| {label} | no | - | - | - | - | - | - |")
            continue
        after, before = best["reliability"], best["reliability_before"]
        lines.append(
            f"| {label} | {'yes' if fit['enabled'] else 'no'} | {budget_label(*budget_of(best))}"
            + (f", best of {fit['restarts']} fits" if fit.get("restarts", 1) > 1 else "")
            + " | "
            f"{best['fit']['threshold']:.3f} | {best['errors']} / {best['errors_before']} | "
            f"{after['false_positives']}/{after['clean_models']} | "
            f"{after['detected']}/{after['backdoored_models']} ({before['detected']}) | "
            f"{after['targets_correct']}/{after['all_to_one_models']} ({before['targets_correct']}) |"
        )
    for fam, fit in earlier:  # a family's fits of another shape, replaced by the one above
        lines += ["", f"{fam}, an earlier fit (`{fit.get('command')}`): {fit['reason']}."]
    for fam, recount in (section.get("recounted_by_family") or {}).items():
        rel = section["reliability_by_family"][fam]
        lines += [
            "",
            f"{fam}: the table above is calibrate_spread.py's own fit; the record the scan quotes is a recount "
            f"({recount['note']}): "
            f"{rel['false_positives']}/{rel['clean_models']} clean flagged, {rel['detected']}/{rel['backdoored_models']} "
            f"backdoors detected, {rel['targets_correct']}/{rel['all_to_one_models']} targets right.",
        ]
    budgets = sorted({budget_of(m, "spread_") for m in section["models"]})
    lines += [
        "",
        "| model | family | attack | ACC | ASR | earlier stages: verdict (target) | "
        + " | ".join(f"spread {budget_label(*b)}" for b in budgets)
        + " | used |",
        "|---|---|---|---|---|---|" + "---|" * len(budgets) + "---|",
    ]
    by_model: dict[str, dict] = {}
    for m in section["models"]:
        by_model.setdefault(m["model"], {})[budget_of(m, "spread_")] = m
    for name, rows in sorted(by_model.items()):
        m = next(iter(rows.values()))
        attack = "clean" if m["attack"] is None else f"{m['attack']} {m['mode']}"
        verdict = m["verdict"] + ("" if m["suspected_target"] is None else f" ({m['suspected_target']})")
        scores = " | ".join(f"{rows[b]['spread_score']:.3f}" if b in rows else "-" for b in budgets)
        lines.append(
            f"| {name} | {m['norm_family']} | {attack} | {_pct(m['acc'])} | {_pct(m['asr'])} | {verdict} | "
            f"{scores} | {'yes' if m['used'] else 'no'} |"
        )
    return lines + [""]


def _heldout_section() -> list[str]:
    """The scan's record on held-out models (the ``heldout`` section of ``calibration.json``,
    written by ``calibrate_reach.py --check --record-check``): per family the record the scan
    quotes, whether the shipped cuts are still the ones it was counted at, and, from each check's
    ``--check-out`` file where it is in the repository, every model with its verdict."""
    from timm_purify.detection import load_calibration
    from timm_purify.detection.ban import family_cuts, heldout_record

    calibration = load_calibration()
    section = calibration.get("heldout")
    if not section:
        return []
    lines = [
        "## Detection: held-out check (models no fit saw)",
        "",
        f"From the `heldout` section of `timm_purify/detection/calibration.json`: {section['what']}.",
        "",
        "| family | checked | clean flagged | backdoors detected | right targets (of all-to-one found) | errors "
        "| quoted by scan |",
        "|---|---|---|---|---|---|---|",
    ]
    files = {}
    for fam, entry in section["by_family"].items():
        rel = entry["record"]
        current = heldout_record(calibration, fam, family_cuts(calibration, fam)) is not None
        lines.append(
            f"| {fam} | {entry['date']} | {rel['false_positives']}/{rel['clean_models']} | "
            f"{rel['detected']}/{rel['backdoored_models']} | {rel['targets_correct']}/{rel['all_to_one_detected']} | "
            f"{entry['errors']} | {'yes' if current else 'no: the cuts or their fit changed since'} |"
        )
        if entry.get("check_out"):
            files.setdefault(entry["check_out"], []).append(fam)
    for name, fams in files.items():
        path = HERE.parent / name  # as given on the command line, from the repository root
        if not path.is_file():
            lines += ["", f"{', '.join(fams)}: the per-model file `{name}` is not in this checkout."]
            continue
        check = json.loads(path.read_text())
        lines += [
            "",
            f"Per model (`{name}`; regenerate with `{check['command']}`):",
            "",
            "| model | family | attack | ACC | ASR | BAN all-to-one | reach | spread | verdict (target) | right |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for fam in fams:
            for m in check["families"][fam]["models"]:
                attack = "clean" if m["attack"] is None else f"{m['attack']} {m['mode']}"
                if m["mode"] == "all-to-one":
                    attack += f" (target {m['target']})"
                verdict = m["verdict"] + (
                    "" if m["reported_target"] is None else f" ({m['reported_target']})"
                )
                reach, spread = m.get("reach_score"), m.get("spread_score")
                lines.append(
                    f"| {m['model']} | {fam} | {attack} | {_pct(m['acc'])} | {_pct(m['asr'])} | "
                    f"{m['ban_statistics']['all_to_one']:.3f} | {'-' if reach is None else f'{reach:.3f}'} | "
                    f"{'-' if spread is None else f'{spread:.3f}'} | {verdict} | {'yes' if m['right'] else '**no**'} |"
                )
        for m in check.get("not_used") or []:
            lines.append(
                f"| {m['model']} | | | {_pct(m['acc'])} | {_pct(m['asr'])} | not used: {m['reason']} | | | | |"
            )
    return lines + [""]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _row_label(row: dict) -> str:
    """The row's method label, naming the polarizer's batch-norm start when it is not the
    method's current default.

    Runs recorded before ``norm_init`` existed used the reference's unit statistics; NPD's
    default has since become ``"features"`` (CNPD's stayed ``"unit"``), so without this the
    same options would name different runs.
    """
    from timm_purify.defenses import DEFENSES
    from timm_purify.detection.ban import DEFAULT_EPS

    label = row["method"]
    if label == "scan":  # scans recorded before the per-family budget ran at the paper's eps
        return f"scan eps={row.get('eps', DEFAULT_EPS):g}"

    spec = DEFENSES.get(label.split()[0])
    default = getattr(spec.config_cls(), "norm_init", None) if spec else None
    config = row.get("config")  # absent from failed runs: nothing to say about them
    if default is None or config is None or "norm_init=" in label:
        return label
    used = config.get("norm_init", "unit")
    return label if used == default else f"{label} norm_init={used}"


def _attack_label(row: dict, epochs: int | None) -> str:
    """The row's attack, naming the backdoored model's training ``epochs`` (its results file's
    ``suite_config``) where ``--epochs`` made them differ from the suite's: a longer-trained
    model is another model (its own ``none`` row and its own DERs), so its rows must not replace
    or mix with the suite model's."""
    suite = SUITES.get(row["suite"])
    if epochs is None or suite is None or epochs == suite.epochs:
        return row["attack"]
    return f"{row['attack']} [{epochs} epochs]"


def render(results_dir: Path = RESULTS_DIR, out: Path = HERE / "RESULTS.md") -> Path:
    """Rebuild RESULTS.md from every JSON file in ``results_dir`` (newest row per key wins).

    Rows carry the time they were measured (``finished``); rows written before that field
    existed count as older than every timed row and follow file-name order among themselves.
    """
    latest: dict[tuple, dict] = {}
    envs: dict[str, dict] = {}
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        payload = json.loads(path.read_text())
        epochs = payload.get("suite_config", {}).get("epochs")
        rows += [(row.get("finished", ""), path.name, row, epochs) for row in payload["rows"]]
        if payload["rows"]:
            envs[path.name] = payload["rows"][-1].get("environment", {})
    # a stable sort keeps file order among untimed rows
    for _, name, row, epochs in sorted(rows, key=lambda item: item[0]):
        row["method"] = _row_label(row)
        row["attack"] = _attack_label(row, epochs)
        key = (row["suite"], row["arch"], row["attack"], row["method"], row.get("seed"))
        latest[key] = {**row, "file": name}
    lines = [
        "# Benchmark results",
        "",
        "Produced by `python benchmarks/run.py` (see its docstring); regenerate this page with",
        "`python benchmarks/run.py --render`. ACC, ASR and RA in %, DER in % (50 = no change),",
        "seconds = wall time of the method alone; ratio = seconds / one epoch of plain fine-tuning",
        "over the same clean set, measured in the same run.",
        "",
        "Reading the rows: a method run with options other than its defaults is labelled with them",
        "(`norm_init=...`: the polarizer's batch-norm start, shown where it is not the method's current",
        "default; NPD rows recorded before the option existed ran `unit`; see PURIFICATION.md);",
        "`npd-tp`/`npd-tu` are given the attack's true target (in `timm-purify demo` the target comes",
        "from the scan instead); `[N clean images]` marks runs on N clean images instead of the",
        "suite's fraction; `[defender seed N]` marks another draw of those clean images (and of the",
        "method's randomness) for the same model; `[N epochs]` after the attack marks a model trained N epochs instead of",
        "the suite's (`--epochs`), with its own `none` row. When the `none` row's ASR is low the",
        "backdoor did not implant and the method rows of that attack measure nothing. Seconds are comparable within one results file",
        "only (see the machines list: thread counts, and whether other jobs shared the CPU). The",
        "benchmark cache does not travel between machines, so a model can be rebuilt, with slightly",
        "different numbers: the `none` row is the newest build's, and each method row's DER is",
        "against the model of its own run.",
        "",
    ]
    cuts = _shipped_cuts()

    def shipped(r: dict) -> bool:
        """Whether a scan row was decided by the shipped calibration (see :func:`_shipped_cuts`)."""
        return any(
            abs(r["threshold"] - c) < 1e-9
            and r.get("all_to_one_agreement", False) == agreement
            and r.get("all_to_one_split_threshold") == split
            for c, agreement, split in cuts.get(r.get("eps"), [])
        )

    # a backdoor that did not implant (its model's no-defence ASR under MIN_ASR) is not a backdoor
    # a scan should find: listed, not counted, as in the calibration (calibrate_scan.py's --min-asr)
    asr = {
        r["model"]: r["asr"] for r in latest.values() if r["method"] == "none" and r.get("asr") is not None
    }

    def implanted(r: dict) -> bool:
        return r["truth"] == "clean" or asr.get(r["model"], 1.0) >= MIN_ASR

    for suite in sorted({k[0] for k in latest}):
        purif = [r for k, r in latest.items() if k[0] == suite and not r["method"].startswith("scan")]
        scans = [r for k, r in latest.items() if k[0] == suite and r["method"].startswith("scan")]
        if purif:
            lines += [
                f"## Suite `{suite}`: purification",
                "",
                "| model | attack | method | ACC | ASR | RA | DER | seconds | ratio to FT epoch |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(
                purif, key=lambda r: (r["arch"], r["attack"], r["method"] != "none", r["method"])
            ):
                if "error" in r:
                    lines.append(
                        f"| {r['arch']} | {r['attack']} | {r['method']} | failed: {r['error'][:80]} | | | | | |"
                    )
                    continue
                ratio = r.get("ratio_to_ft_epoch")
                lines.append(
                    f"| {r['arch']} | {r['attack']} | {r['method']} | {_pct(r['acc'])} | {_pct(r['asr'])} | {_pct(r['ra'])} | "
                    f"{_pct(r.get('der'))} | {r.get('seconds', 0):.1f} | {'-' if ratio is None else f'{ratio:.1f}x'} |"
                )
            lines.append("")
        if scans:
            lines += [f"## Suite `{suite}`: detection", ""]
        for method in sorted({r["method"] for r in scans}, reverse=True):
            group = [r for r in scans if r["method"] == method]
            weak = [r for r in group if shipped(r) and not implanted(r)]
            current = [r for r in group if shipped(r) and implanted(r)]
            correct = sum(r["verdict"] == r["truth"] for r in current)
            fp = sum(r["truth"] == "clean" and r["verdict"] != "clean" for r in current)
            a2o = [r for r in current if r.get("true_target") is not None]
            tgt = sum(r["suspected_target"] == r["true_target"] for r in a2o)
            earlier = len(group) - len(current) - len(weak)
            lines += [
                f"`{method}`, rows scanned with the shipped calibration: detection accuracy {correct}/{len(current)}; "
                f"false positives on clean models: {fp}; target found for {tgt}/{len(a2o)} all-to-one models."
                + (
                    f" {earlier} more rows were scanned with an earlier calibration (their threshold is none of "
                    "the shipped ones for the family scanned at that budget): listed, not counted."
                    if earlier
                    else ""
                )
                + (
                    f" {len(weak)} more rows are of backdoors that did not implant (no-defence ASR under "
                    f"{MIN_ASR:.0%}): listed, not counted."
                    if weak
                    else ""
                ),
                "",
                "| model | truth | verdict | score | threshold | suspected target | true target "
                "| clean images | seconds | ratio to FT epoch | calibration |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sorted(group, key=lambda r: (r["arch"], r["attack"], r.get("seed", 0))):
                ratio = r.get("ratio_to_ft_epoch")
                lines.append(
                    f"| {r['model']} | {r['truth']} | {r['verdict']} | {r['score']:.3f} | {r['threshold']:.3f} | "
                    f"{r['suspected_target']} | {r['true_target']} | {r.get('num_clean', '-')} | {r['seconds']:.1f} | "
                    f"{'-' if ratio is None else f'{ratio:.1f}x'} | {'shipped' if shipped(r) else 'earlier'} |"
                )
            lines.append("")
    lines += _calibration_section()
    lines += _reach_section()
    lines += _spread_section()
    lines += _heldout_section()
    lines += ["## Machines and versions", ""]
    for name, env in sorted(envs.items()):
        lines.append(f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--archs", help="comma-separated subset of: " + ",".join(RECIPES))
    parser.add_argument(
        "--attacks", help="comma-separated subset of: " + ",".join(ATTACKS) + " ('none': clean models only)"
    )
    parser.add_argument(
        "--methods", default="", help="comma-separated defences (default: none, i.e. no-defence rows only)"
    )
    parser.add_argument("--options", help='JSON {"method": {"option": value}} passed to purify')
    parser.add_argument("--detect", action="store_true", help="also scan every model, and clean models")
    parser.add_argument(
        "--clean-seeds", type=int, default=2, help="clean models per architecture for --detect"
    )
    parser.add_argument(
        "--first-clean-seed",
        type=int,
        default=0,
        help="seed of the first clean model (split a zoo over jobs)",
    )
    parser.add_argument("--train-size", type=int, help="class-balanced subset of the training split")
    parser.add_argument("--epochs", type=int, help="training epochs instead of the suite's (a new cache key)")
    parser.add_argument(
        "--clean-count",
        type=int,
        help="defender's clean images (class-balanced) instead of the suite's fraction, e.g. 10 = one-shot",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--defender-seed",
        type=int,
        help="seed of the defender's clean images and of the method (default: --seed); the model "
        "keeps --seed, so one model can be purified from several draws of its clean set",
    )
    parser.add_argument("--cache", default=str(HERE / "cache"))
    parser.add_argument("--out", help="JSON output path (default: results/<suite>-<time>.json)")
    parser.add_argument("--render", action="store_true", help="only rebuild RESULTS.md from results/*.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.render:
        run(args)
    print(f"wrote {render()}")


if __name__ == "__main__":
    sys.exit(main())
