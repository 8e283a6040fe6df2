"""``timm-purify evaluate``: clean accuracy and, given an attack.json, ASR and RA."""

from __future__ import annotations

import json

import click

__all__ = ["evaluate"]


@click.command()
@click.argument("model")
@click.option(
    "--data",
    default="fashion-mnist-mini",
    show_default=True,
    help="Bundled set or image folder (test split).",
)
@click.option(
    "--attack",
    "attack_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="attack.json describing the trigger (as written by `timm-purify backdoor`).",
)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(
    model: str, data: str, attack_file: str | None, batch_size: int, device: str | None, as_json: bool
) -> None:
    """Evaluate MODEL on the test split of --data."""
    from ..metrics import evaluate as run_evaluate
    from ._common import open_model

    net = open_model(model)
    try:
        result = run_evaluate(net, data, attack=attack_file, batch_size=batch_size, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))
