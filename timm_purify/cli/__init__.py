"""The ``timm-purify`` command line: one click group, one module per command.

Each command module defines a click command and is listed in :data:`_COMMANDS`; a module that
fails to import (an optional dependency missing) does not take the others down.
"""

from __future__ import annotations

import importlib

import click

from .._version import __version__

__all__ = ["main"]

# (module under timm_purify.cli, attribute holding the click command)
_COMMANDS = (
    ("layers", "layers"),
    ("backdoor", "backdoor"),
    ("evaluate", "evaluate"),
    ("scan", "scan"),
    ("purify", "purify"),
    ("push", "push"),
    ("demo", "demo"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="timm-purify")
def main() -> None:
    """Detect and remove neural backdoors in timm image classifiers.

    MODEL arguments accept a Hub id (org/name or hf-hub:org/name), a local folder
    (local-dir:/path or a plain path) or a timm architecture name with --checkpoint.
    """


for _module, _attr in _COMMANDS:
    try:
        _mod = importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_module}":
            raise
        continue  # command not written yet
    main.add_command(getattr(_mod, _attr))
