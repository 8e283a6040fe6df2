"""``timm-purify demo``: the whole job on the embedded default, start to finish.

Builds a backdoored resnet18 on the bundled Fashion-MNIST subset, scans it, purifies it with
the default method, evaluates before and after, and writes the purified folder with its model
card and plots. Nothing outside the package is needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .._auto import AUTO, choose_method, why

__all__ = ["demo"]

DATA = "fashion-mnist-mini"
# Options the demo passes to each method. A resnet18 trained for a few epochs still has the
# last norm of each residual branch near timm's zero initialisation, so a polarizer at the
# reference spot (the branch input) barely reaches the logits: the demo polarizes the last
# stage's output instead, with a learning rate that converges within its short budget
# (measured on the demo's model: benchmarks/RESULTS.md, issue notes).
_POLARIZER = {"layer": "last-stage", "lr": 0.1, "epochs": 30}
METHOD_OPTIONS = {name: _POLARIZER for name in ("npd", "npd-tp", "npd-tu", "cnpd-r", "cnpd-e", "cnpd-a")}


@click.command()
@click.option(
    "--out",
    "out_dir",
    default="demo-output",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder to create (must not exist or be empty).",
)
@click.option("--model", "arch", default="resnet18", show_default=True, help="timm architecture to backdoor.")
@click.option("--attack", "attack_name", default="badnets", show_default=True)
@click.option(
    "--method",
    default=AUTO,
    show_default=True,
    help="Purification method; 'auto' lets the scan choose, as `timm-purify purify --method auto` "
    "does: npd-tp towards the scan's suspected target (with a larger attack budget) when it names "
    "one, awm (its trigger search shaped as the scan's reading found it) for an all-to-all "
    "pattern, else npd.",
)
@click.option(
    "--epochs", type=int, default=5, show_default=True, help="Epochs to train the backdoored model."
)
@click.option(
    "--clean-fraction",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of the training split the defender holds as clean data.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(
    out_dir: str,
    arch: str,
    attack_name: str,
    method: str,
    epochs: int,
    clean_fraction: float,
    seed: int,
    device: str | None,
    quiet: bool,
) -> None:
    """Backdoor a model on the bundled data, then scan, purify, evaluate and save it."""
    from .. import defenses
    from .._hub import load_model
    from .._save import OutputExistsError, _check_out_dir, save_pretrained
    from .._train import TrainConfig, build_backdoored_model
    from ..attacks import build_attack
    from ..data import clean_subset, load_data
    from ..detection import scan
    from .purify import _summary, reproduce_command

    out = Path(out_dir).expanduser()
    try:
        _check_out_dir(out, [])
    except OutputExistsError as err:
        raise click.ClickException(str(err)) from err
    bd_dir, pure_dir = out / "backdoored", out / "purified"
    start = time.perf_counter()

    click.echo(f"[1/4] training a {attack_name}-backdoored {arch} on {DATA} ({epochs} epochs)")
    attack = build_attack(attack_name, num_classes=10, seed=seed)
    built = build_backdoored_model(
        model=arch,
        data=DATA,
        attack=attack,
        out_dir=bd_dir,
        config=TrainConfig(epochs=epochs, seed=seed),
        device=device,
        quiet=quiet,
    )
    click.echo(f"      {built.metrics} ({built.seconds:.0f} s) -> {bd_dir}")

    model = load_model(str(bd_dir))
    click.echo("[2/4] scanning it (files and behaviour)")
    # one clean subset for both steps: the scan reads the images the defence then trains on
    clean = clean_subset(load_data(DATA, split="train", model=model), fraction=clean_fraction, seed=seed)
    report = scan(model, clean, files=str(bd_dir), seed=seed, device=device, quiet=quiet)
    target = (
        f", suspected target {report.suspected_target} ({report.target_name})"
        if report.suspected_target is not None
        else ""
    )
    click.echo(
        f"      {report.verdict}: score {report.score:.3f} vs threshold {report.threshold:.3f}{target}"
    )

    method, chosen = choose_method(method, report)
    options = {**METHOD_OPTIONS.get(method, {}), **chosen}  # auto's options, epochs included, win
    click.echo(f"[3/4] purifying with {method}{why(chosen)} on {clean_fraction:.0%} clean data")
    result = defenses.purify(
        model,
        clean,
        method=method,
        eval_data=DATA,
        eval_attack=bd_dir / "attack.json",
        seed=seed,
        device=device,
        quiet=quiet,
        **options,
    )

    click.echo("[4/4] writing the purified folder with its model card")
    command = reproduce_command(
        {
            "model": str(bd_dir),
            "data": DATA,
            "method": method,
            "out_dir": str(pure_dir),
            "clean_fraction": clean_fraction,
            "eval_data": DATA,
            "attack_file": str(bd_dir / "attack.json"),
            "seed": seed,
            "options": [f"{k}={v}" for k, v in options.items()],
        }
    )
    saved = save_pretrained(result, pure_dir, scan_report=report, command=command)
    record = json.loads((saved / "purify_result.json").read_text())
    click.echo(_summary(result, report, saved, record["form"], record["fold"]["reason"]))
    click.echo(f"done in {time.perf_counter() - start:.0f} s; model card: {saved / 'README.md'}")
