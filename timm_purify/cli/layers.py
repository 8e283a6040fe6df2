"""``timm-purify layers``: list the insertion spots of a model and the automatic choice."""

from __future__ import annotations

import json

import click

__all__ = ["layers"]


@click.command()
@click.argument("model")
@click.option(
    "--num-classes", type=int, default=None, help="Head size when MODEL is a bare architecture name."
)
@click.option("--img-size", type=int, default=None, help="Input size when MODEL is a bare architecture name.")
@click.option("--json", "as_json", is_flag=True, help="Print the spots as JSON.")
def layers(model: str, num_classes: int | None, img_size: int | None, as_json: bool) -> None:
    """List where a polarizer can be inserted in MODEL, marking the automatic spot."""
    from .._layers import find_layers, resolve_spot
    from ._common import open_model

    net = open_model(model, num_classes=num_classes, img_size=img_size)
    spots = find_layers(net)
    auto = resolve_spot(net, "auto", spots=spots)
    if as_json:
        click.echo(json.dumps({"auto": auto.to_dict(), "spots": [s.to_dict() for s in spots]}, indent=2))
        return
    click.echo(f"{'':2}{'depth':>6}  {'stage':>5}  {'where':6}  {'layout':6}  {'channels':>8}  name")
    for s in spots:
        mark = "*" if s == auto else " "
        stage = "-" if s.stage is None else str(s.stage)
        click.echo(
            f"{mark:2}{s.depth:6.3f}  {stage:>5}  {s.where:6}  {s.layout:6}  {s.channels:8d}  {s.name}"
        )
    click.echo(f"\n* automatic spot (layer='auto'): {auto.name} ({auto.where})")
