"""``timm-purify scan``: is this model safe to load, and does it carry a backdoor?"""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["scan", "EXIT_CLEAN", "EXIT_BACKDOORED", "EXIT_UNSAFE"]

EXIT_CLEAN = 0
EXIT_BACKDOORED = 3
EXIT_UNSAFE = 4
_BAR_WIDTH = 30


def _histogram_lines(counts: list[int], names: list[str] | None, *, mark: int | None) -> list[str]:
    """A small text bar chart, one line per class, the suspected target marked."""
    total = max(sum(counts), 1)
    labels = [names[i] if names and i < len(names) else str(i) for i in range(len(counts))]
    width = max(len(f"{i} {label}") for i, label in enumerate(labels))
    lines = []
    for i, (label, count) in enumerate(zip(labels, counts, strict=True)):
        bar = "#" * round(_BAR_WIDTH * count / total)
        flag = "  <- suspected target" if i == mark else ""
        lines.append(f"  {f'{i} {label}':<{width}} |{bar:<{_BAR_WIDTH}}| {count:4d}{flag}")
    return lines


def _summary(report, model: str) -> str:
    from ..detection.report import SPREAD_NAMES, spread_readings, stage_label

    cfg = report.config
    verdict = report.verdict.upper() + (f" ({report.pattern})" if report.pattern else "")
    stats = cfg["statistics"]

    def compare(score: float, threshold: float) -> str:
        return f"{score:.3f} {'>' if score > threshold else '<='} threshold {threshold:.3f}"

    lines = [
        f"Backdoor scan of {model}: {cfg['num_search']} clean images for the searches, "
        f"{cfg['num_held_out']} held out, {report.seconds:.1f} s",
        f"verdict: {verdict}",
        f"  all-to-one score {compare(stats['all_to_one'], cfg['threshold'])}",
        f"  all-to-all score {stats['all_to_all']:.3f} (not used for {cfg['norm_family']} models: see the calibration)"
        if cfg["all_to_all_threshold"] is None
        else f"  all-to-all score {compare(stats['all_to_all'], cfg['all_to_all_threshold'])}",
    ]
    if report.suspected_target is not None:
        lines.append(f"suspected target: class {report.suspected_target} ({report.target_name})")
    if report.pattern == "all-to-all":
        mapping = cfg["statistics"]["all_to_all_map"]
        if cfg.get("decided_by") == "spread":  # where the spread perturbation sent most of each class
            rows = report.spread["confusion"]
            mapping = [
                max((j for j in range(len(row)) if j != k), key=row.__getitem__)
                if 2 * (sum(row) - row[k]) > sum(row)
                else None
                for k, row in enumerate(rows)
            ]
        names = report.class_names or []
        pairs = [
            f"{names[k] if k < len(names) else k} -> {names[j] if j < len(names) else j}"
            for k, j in enumerate(mapping)
            if j is not None
        ]
        lines.append("class shifts: " + ", ".join(pairs))
    reach = report.reach
    if reach is not None:
        lines.append(
            f"  universal reach score {compare(reach['score'], reach['threshold'])} "
            f"(class {reach['suspected_target']}; {reach['norm']} budget {reach['rho']:g}, {reach['seconds']:.1f} s)"
        )
    for reading in spread_readings(report.spread):
        where = {
            "window": lambda r: (
                f"best {r['side']}-pixel window at row {r['corner'][0]}, column {r['corner'][1]}"
            ),
            "blend": lambda r: f"blend weight {r['alpha']:g}",
            "l2": lambda r: (
                f"L2 budget {r['rho']:g}"
                + (
                    f", best of {r['restarts']} fits: " + ", ".join(f"{v:.3f}" for v in r["restart_scores"])
                    if r.get("restarts", 1) > 1
                    else ""
                )
            ),
        }[reading["shape"]](reading)
        lines.append(
            f"  {SPREAD_NAMES[reading['shape']]} score {compare(reading['score'], reading['threshold'])} "
            f"(all-to-all reading; {where}, {reading['seconds']:.1f} s)"
        )
    for stage in cfg.get("skipped_stages", []):
        lines.append(
            f"  {stage_label(cfg, stage)}: skipped (an earlier stage's verdict and target already stand)"
        )
    if cfg.get("decided_by"):
        lines.append(f"decided by: {cfg['decided_by']}")
    lines += cfg.get("cautions", [])
    lines.append(
        f"accuracy on held-out images: clean {report.clean_acc:.1%}, with noise {report.noisy_acc:.1%} "
        f"(noise budget eps {cfg['eps']:g})"
    )
    restarts = report.config.get("restarts", 1)
    lines.append(
        f"predictions of the held-out images with adversarial noise ({restarts} noise search(es) pooled; "
        "the verdict's statistic):"
    )
    lines += _histogram_lines(report.histogram_noisy, report.class_names, mark=report.suspected_target)
    if reach is not None:
        lines.append(
            "universal reach: share of held-out images of the other classes that one small perturbation "
            "shared by all sends to each class (percent):"
        )
        lines += _histogram_lines(
            [round(100 * r) for r in reach["reach"]], report.class_names, mark=reach["suspected_target"]
        )
    if report.static_findings:
        worst = [f for f in report.static_findings if f["severity"] != "info"]
        lines.append(
            f"file inspection: {len(report.static_findings)} finding(s), "
            f"{sum(f['severity'] == 'critical' for f in worst)} critical, "
            f"{sum(f['severity'] == 'warning' for f in worst)} warning(s)"
        )
        lines += [f"  [{f['severity']}] {f['file']}: {f['message']}" for f in worst]
    return "\n".join(lines)


@click.command(
    epilog=(
        "Exit status: 0 when no backdoor is found, 3 when the model is backdoored, 4 when a file "
        "of the model is unsafe to load (the model is then not loaded and not scanned), 1 on a "
        "usage error (bad option, unreadable data)."
    )
)
@click.argument("model")
@click.option(
    "--data",
    required=True,
    help="Clean images of the model's classes: an image folder (one sub-folder per class; its "
    "train split when it has one) or a bundled set (fashion-mnist-mini).",
)
@click.option(
    "--json", "json_file", type=click.Path(dir_okay=False), default=None, help="Write the report here."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--clean-count",
    type=int,
    default=None,
    help="Use a class-balanced subset of this many images (default: all of --data).",
)
@click.option("--clean-fraction", type=float, default=None, help="Or this share of --data, e.g. 0.01.")
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Noise bound (default: the budget calibrated for the model's normalisation family).",
)
@click.option("--steps", type=int, default=None, help="Noise ascent steps (default 30).")
@click.option(
    "--reach",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Second stage, universal reach (one small perturbation per class): 'auto' runs it where "
    "the calibration fitted it for the model's normalisation family and it can still change the "
    "verdict or target; 'on' always.",
)
@click.option(
    "--reach-threshold",
    type=float,
    default=None,
    help="Threshold of the reach score (default: the calibrated one; needed for --reach on where none is).",
)
@click.option(
    "--spread",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="All-to-all readings, spread (one untargeted perturbation shared by all images: over the whole image, "
    "pasted in one window of a grid, or blended into the whole image, as calibrated per normalisation family): "
    "'auto' runs them where the calibration fitted them for the model's family and no earlier stage fired; "
    "'on' always. A family's readings all run (those after the first that fires tell the trigger's shape).",
)
@click.option(
    "--spread-shape",
    type=click.Choice(["l2", "window", "blend"]),
    default=None,
    help="Run this spread reading only (default: the ones calibrated for the model's family); another than "
    "those needs --spread-threshold.",
)
@click.option(
    "--spread-threshold",
    type=float,
    default=None,
    help="Threshold of the spread score (default: the calibrated one; needed for --spread on where none is, "
    "and with --spread-shape for a family calibrated with several readings).",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: accelerate's choice).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def scan(
    model: str,
    data: str,
    json_file: str | None,
    seed: int,
    clean_count: int | None,
    clean_fraction: float | None,
    eps: float | None,
    steps: int | None,
    reach: str,
    reach_threshold: float | None,
    spread: str,
    spread_shape: str | None,
    spread_threshold: float | None,
    device: str | None,
    quiet: bool,
) -> None:
    """Scan MODEL for a backdoor (BAN: adversarial neuron noise and a feature mask; where
    calibrated also universal reach, one small perturbation per class, and spread, one untargeted
    perturbation, pasted or blended pattern that moves every class elsewhere: the all-to-all readings).

    MODEL is a local timm folder, a Hub id or an architecture name. The files of a folder
    or of the downloaded Hub snapshot are first inspected without loading them; the behavioural scan then needs a few
    hundred clean images of the model's classes (--data).
    """
    from .._hub import ModelLoadError, _download_hub, resolve_source
    from ..detection.ban import ScanOptionError
    from ..detection.ban import scan as run_scan
    from ..detection.static import inspect_files
    from ._common import open_model

    ctx = click.get_current_context()
    try:
        kind, value = resolve_source(model)
        # a Hub model's files are fetched first (the cache, or HF_ENDPOINT) and inspected like a
        # folder's, so an unsafe upload gets the same report and exit status as a local one
        files = _download_hub(value) if kind == "hub" else Path(value) if kind == "folder" else None
    except ModelLoadError as err:
        raise click.ClickException(str(err)) from err
    if files is not None and files.exists():
        findings = inspect_files(files)
        critical = [f for f in findings if f.severity == "critical"]
        if critical:
            click.echo(f"UNSAFE: {model} holds {len(critical)} file(s) that must not be loaded; not scanned.")
            for f in critical:
                click.echo(f"  [{f.kind}] {f.file}: {f.message}")
            if json_file:
                record = {
                    "unsafe_files": True,
                    "verdict": None,
                    "static_findings": [f.to_dict() for f in findings],
                }
                Path(json_file).write_text(json.dumps(record, indent=2) + "\n")
            ctx.exit(EXIT_UNSAFE)
    options = {k: v for k, v in (("eps", eps), ("steps", steps)) if v is not None}
    options["reach"] = reach
    if reach_threshold is not None:
        options["reach_threshold"] = reach_threshold
    options["spread"] = spread
    if spread_shape is not None:
        options["spread_shape"] = spread_shape
    if spread_threshold is not None:
        options["spread_threshold"] = spread_threshold
    net = open_model(model, snapshot=files if kind == "hub" else None)  # no second Hub request
    try:
        report = run_scan(
            net,
            data,
            files=files,
            seed=seed,
            clean_count=clean_count,
            clean_fraction=clean_fraction,
            device=device,
            quiet=quiet,
            **options,
        )
    except (ScanOptionError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(_summary(report, model))
    if json_file:
        report.to_json(json_file)
        click.echo(f"report written to {json_file}")
    if report.unsafe_files:
        ctx.exit(EXIT_UNSAFE)
    ctx.exit(EXIT_BACKDOORED if report.backdoored else EXIT_CLEAN)
