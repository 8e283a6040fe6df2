"""``timm-purify push``: publish a folder written by ``timm-purify purify`` to the Hub."""

from __future__ import annotations

import click

__all__ = ["push"]


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--token", default=None, help="Hub token with write access (default: the logged-in one).")
@click.option("--message", "commit_message", default=None, help="Commit message.")
def push(directory: str, repo_id: str, private: bool, token: str | None, commit_message: str | None) -> None:
    """Upload DIRECTORY (model card, config.json, safetensors) to the Hub as REPO_ID (org/name).

    The repository is created when missing; everything goes up in one commit. Folders holding
    pickle-based files or no model card are refused before anything is sent.
    """
    from .._hub import HubPushError, push_to_hub

    try:
        url = push_to_hub(directory, repo_id, private=private, token=token, commit_message=commit_message)
    except HubPushError as err:
        raise click.ClickException(str(err)) from err
    click.echo(url)
