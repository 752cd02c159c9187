"""``credkeeper apikey``: create, list and revoke the API keys of ``credkeeper serve``.

The keys live in an API key file (``--file``, or ``CREDKEEPER_API_KEYS_FILE``), which holds
their SHA-256 digests, never the keys: ``create`` prints the new key once, alone on the last
line of stdout, for a script to capture with ``tail -n 1``. The global options are not used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from credkeeper.server._apikeys import (
    SCOPES,
    ApiKey,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)

__all__ = ["API_KEYS_VARIABLE", "apikey"]

#: The environment variable naming the API key file, shared with ``credkeeper serve``.
API_KEYS_VARIABLE = "CREDKEEPER_API_KEYS_FILE"

_file_option = click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help=f"The API key file [env {API_KEYS_VARIABLE}].",
)


def _key_file(file: Path | None) -> Path:
    """``--file``, else the variable (an empty one counts as unset), else a usage error."""
    if file is None:
        value = os.environ.get(API_KEYS_VARIABLE, "").strip()
        if not value:
            raise click.UsageError(f"no API key file: pass --file FILE or set {API_KEYS_VARIABLE}")
        file = Path(value)
    return file.expanduser()


def _iso(key: ApiKey) -> str:
    if key.created_at is None:
        return "-"
    return key.created_at.isoformat(timespec="seconds").replace("+00:00", "Z")


@click.group(short_help="Create, list and revoke the API keys of `credkeeper serve`.")
def apikey() -> None:
    """Create, list and revoke the API keys `credkeeper serve` accepts.

    The API key file (--file, or CREDKEEPER_API_KEYS_FILE) keeps each key's name, scopes,
    credential-key glob and SHA-256 digest, never the key itself. Scopes: admin,
    credentials:read, credentials:write, messages, metrics.
    """


@apikey.command(short_help="Make a new API key; print it once.")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    type=click.Choice(sorted(SCOPES)),
    metavar="SCOPE",
    help=f"A scope the key holds; repeat for several ({', '.join(sorted(SCOPES))}).",
)
@click.option(
    "--keys-matching",
    metavar="GLOB",
    help="Limit the key to credential keys matching GLOB (fnmatch, case-sensitive), such as "
    "'acme:*' for one tenant [default: every credential key].",
)
@_file_option
def create(
    name: str, scopes: tuple[str, ...], keys_matching: str | None, file: Path | None
) -> None:
    """Make a new API key NAME holding each --scope, and add its digest to the API key file.

    The file is created (mode 0600) when missing. The key is printed once, alone on the last
    line of stdout; only its digest is kept, so a lost key is revoked and made again.
    """
    path = _key_file(file)
    if not scopes:
        raise click.BadParameter(
            f"give at least one: {', '.join(sorted(SCOPES))}", param_hint="'--scope'"
        )
    key = create_api_key(path, name, scopes, keys_matching=keys_matching)
    reach = (
        "every credential key" if keys_matching is None else f"credential keys {keys_matching!r}"
    )
    click.echo(
        f"created API key {name!r} in {path} (mode 0600): scopes {' '.join(sorted(set(scopes)))}; "
        f"reaches {reach}"
    )
    click.echo("the key is shown once, here; the file keeps only its digest:")
    click.echo(key)


@apikey.command("list", short_help="List the API keys: names, scopes, globs; never a key.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@_file_option
def list_(as_json: bool, file: Path | None) -> None:
    """List the API keys in the file: name, scopes, credential-key glob, creation time.

    Neither keys (the file has none) nor their digests are printed.
    """
    path = _key_file(file)
    keys = list_api_keys(path)
    if as_json:
        rows = [
            {
                "name": key.name,
                "scopes": sorted(key.scopes),
                "keys_matching": key.keys_matching,
                "created_at": None if key.created_at is None else _iso(key),
            }
            for key in keys
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    console = Console(highlight=False, soft_wrap=False)
    if not keys:
        console.print(f"no API keys in {escape(str(path))}")
        return
    console.print(f"{len(keys)} API key(s) in {escape(str(path))}")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for heading in ("name", "scopes", "keys matching", "created"):
        table.add_column(heading, overflow="fold")
    for key in keys:
        table.add_row(
            Text(key.name),
            Text(" ".join(sorted(key.scopes))),
            Text(key.keys_matching or "*", style="" if key.keys_matching else "dim"),
            Text(_iso(key)),
        )
    console.print(table)


@apikey.command(short_help="Remove an API key from the file.")
@click.argument("name")
@_file_option
def revoke(name: str, file: Path | None) -> None:
    """Remove the API key NAME from the API key file; exits 1 when there is none.

    `credkeeper serve` reads the file when it starts: restart it for the key to be refused.
    """
    path = _key_file(file)
    if not revoke_api_key(path, name):
        names = ", ".join(repr(key.name) for key in list_api_keys(path)) or "none"
        raise click.ClickException(
            f"no API key named {name!r} in {path} (its keys: {names}); "
            f"see `credkeeper apikey list --file {path}`"
        )
    click.echo(f"revoked API key {name!r} in {path}")
