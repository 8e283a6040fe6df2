"""``timm-purify backdoor``: build a backdoored (or clean) timm model to test defences on."""

from __future__ import annotations

import click

__all__ = ["backdoor"]


@click.command()
@click.option(
    "--model", "arch", required=True, help="timm architecture to train from scratch, e.g. resnet18."
)
@click.option(
    "--attack", "attack_name", default="badnets", show_default=True, help="Attack name (see --list-attacks)."
)
@click.option(
    "--data", default="fashion-mnist-mini", show_default=True, help="Bundled set name or image folder."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write (must not exist).",
)
@click.option("--clean", is_flag=True, help="Train the same recipe without poison (a clean reference model).")
@click.option("--target", type=int, default=0, show_default=True, help="Target class (all-to-one).")
@click.option("--all-to-all", is_flag=True, help="Label y -> (y+1) mod K instead of one target.")
@click.option("--poison-rate", type=float, default=0.1, show_default=True)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--img-size", type=int, default=32, show_default=True)
@click.option("--train-size", type=int, default=None, help="Class-balanced subset of the training split.")
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "adamw"]),
    default="sgd",
    show_default=True,
    help="adamw suits transformers trained from scratch.",
)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extra timm.create_model argument, e.g. patch_size=4 (repeatable).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="torch device (default: accelerate's choice).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def backdoor(
    arch: str,
    attack_name: str,
    data: str,
    out_dir: str,
    clean: bool,
    target: int,
    all_to_all: bool,
    poison_rate: float,
    epochs: int,
    lr: float,
    batch_size: int,
    img_size: int,
    train_size: int | None,
    optimizer: str,
    weight_decay: float,
    model_args: tuple[str, ...],
    seed: int,
    device: str | None,
    quiet: bool,
) -> None:
    """Train a timm model on poisoned data and write a timm folder plus attack.json."""
    from .._train import TrainConfig, build_backdoored_model, parse_model_args
    from ..attacks import build_attack
    from ..data import load_data

    try:
        attack = None
        if not clean:
            num_classes = load_data(data, split="test", input_size=(3, 8, 8)).num_classes
            attack = build_attack(
                attack_name,
                target=target,
                mode="all-to-all" if all_to_all else "all-to-one",
                poison_rate=poison_rate,
                seed=seed,
                num_classes=num_classes,
            )
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            optimizer=optimizer,
            weight_decay=weight_decay,
        )
        result = build_backdoored_model(
            model=arch,
            data=data,
            attack=attack,
            out_dir=out_dir,
            img_size=img_size,
            config=config,
            train_size=train_size,
            model_kwargs=parse_model_args(model_args),
            device=device,
            quiet=quiet,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise click.ClickException(str(err)) from err
    kind = "clean" if clean else f"{attack_name} ({'all-to-all' if all_to_all else f'target {target}'})"
    click.echo(f"wrote {result.path}: {arch}, {kind}, {result.metrics}, {result.seconds:.0f} s")
