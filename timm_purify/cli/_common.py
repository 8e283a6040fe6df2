"""Helpers shared by the command modules."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from torch import nn

__all__ = ["open_model"]


def open_model(
    spec: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    snapshot: str | os.PathLike | None = None,
) -> nn.Module:
    """:func:`timm_purify._hub.load_model` for a command: a user mistake or an unsafe file
    becomes a :class:`click.ClickException`, so the command prints one clean line of advice
    and exits with status 1 instead of a traceback."""
    from .._hub import ModelLoadError, load_model
    from ..detection.static import UnsafeFileError

    try:
        return load_model(
            spec, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint, snapshot=snapshot
        )
    except (ModelLoadError, UnsafeFileError) as err:
        raise click.ClickException(str(err)) from err
