"""The ``timm-purify`` command line: one click group, one module per command.

Each command module defines a click command and is listed in :data:`_COMMANDS`; command
modules import the library lazily, so ``timm-purify --help`` stays fast.
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__

__all__ = ["main"]

# (module under timm_purify.cli, attribute holding the click command), in --help order
_COMMANDS = (
    ("demo", "demo"),
    ("scan", "scan"),
    ("purify", "purify"),
    ("evaluate", "evaluate"),
    ("push", "push"),
    ("backdoor", "backdoor"),
    ("layers", "layers"),
)


class _OrderedGroup(click.Group):
    """List commands in the order above (the main job first), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_OrderedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="timm-purify")
def main() -> None:
    """Detect and remove neural backdoors in timm image classifiers.

    MODEL arguments accept a Hub id (org/name or hf-hub:org/name), a local folder
    (local-dir:/path or a plain path) or a timm architecture name with --checkpoint.
    """


for _module, _attr in _COMMANDS:
    main.add_command(getattr(importlib.import_module(f"{__name__}.{_module}"), _attr))
