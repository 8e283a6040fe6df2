"""Helpers shared by the command modules."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from torch import nn

__all__ = ["AUTO", "choose_method", "open_model"]

# The method name that lets the scan steer NPD (``timm-purify purify`` and ``demo``).
AUTO = "auto"


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


def choose_method(method: str, report) -> tuple[str, dict]:
    """The method to run and its extra options. ``auto`` lets the scan's finding steer NPD:
    with a suspected all-to-one target, NPD's known-target variant (npd-tp) attacks towards
    that class (plain NPD's per-image guess, the runner-up class, misses a patch trigger whose
    target is not the images' natural neighbour: ``benchmarks/PURIFICATION.md``); otherwise
    (a clean verdict, or an all-to-all pattern with no single target) plain npd estimates a
    target per image."""
    if method != AUTO:
        return method, {}
    if report.verdict == "backdoored" and report.suspected_target is not None:
        return "npd-tp", {"target": int(report.suspected_target)}
    return "npd", {}
