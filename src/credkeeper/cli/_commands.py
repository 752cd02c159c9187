"""The ``credkeeper`` command line: set up stores; import, inspect, refresh, re-seal credentials.

Every command is one function decorated with ``@cli.command()`` that takes the run's
:class:`~credkeeper.cli._options.GlobalOptions` (``@pass_options``) and asks them for the
store, the key ring or a manager. Errors are not handled in commands: the group turns every one
into a single ``credkeeper: error: ...`` line on stderr and an exit code from the table in
``_errors`` (a traceback too with ``--debug``).

No command prints a token. ``keygen`` prints key material, which is its job, to stdout only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from credkeeper import __version__
from credkeeper._credentials import Credentials
from credkeeper._exceptions import (
    ConfigurationError,
    CredentialNotFound,
    CredentialsError,
    StoreCorrupted,
    UnknownSchemeError,
)
from credkeeper._files import make_private_directories
from credkeeper._journal import RescueJournal, default_journal_dir
from credkeeper._keyring import KeyRing
from credkeeper._migrate import migrate
from credkeeper._provider import SETTING_PROFILES
from credkeeper._record import check_key
from credkeeper._registry import KNOWN_SCHEMES
from credkeeper._rekey import rekey
from credkeeper._settings import ENVIRONMENT, Settings, display_url
from credkeeper._store import declares_plaintext
from credkeeper._sweeper import Sweeper, SweepReport
from credkeeper._wrapper import DEFAULT_WRAPPER_URL, WrapperClient

from ._apikey import apikey
from ._demo import run_demo
from ._errors import PREFIX, ExitCode, describe, epilog, exit_code_for, one_line
from ._options import GlobalOptions, pass_options
from ._output import (
    expiry_phrase,
    last_refresh_line,
    load_records,
    mapping_table,
    migrate_summary,
    progress_bar,
    record_json,
    status_table,
    sweep_progress,
    sweep_summary,
)
from ._serve import serve

if TYPE_CHECKING:  # the SQL store loads only for init-store, and only if installed
    from credkeeper_sql import StoreCheck

__all__ = ["cli", "main"]

#: What a warning line starts with: something is wrong, but the command did its job.
_WARNING = "credkeeper: warning: "

# Credential documents are a few hundred bytes; refuse to buffer whatever a pipe sends.
_MAX_INPUT = 1 << 20
_CLAUDE_CODE_FILE = Path("~/.claude/.credentials.json")


class _CommandError(Exception):
    """An exception a command let escape, carried out of click to be reported as one line."""

    def __init__(self, exc: BaseException) -> None:
        self.message = describe(exc)
        self.exit_code = exit_code_for(exc)
        super().__init__(self.message)


class _Group(click.Group):
    """The ``credkeeper`` group: every error becomes one line on stderr and a documented code."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; an exception it raises becomes a :class:`_CommandError`."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            # Only here is the --debug flag known and the traceback still at hand.
            if ctx.params.get("debug"):
                click.echo(traceback.format_exc(), err=True, nl=False)
            raise _CommandError(exc) from exc

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; exit with its code, or return it when not ``standalone_mode``.

        click's own reporting prints usage blocks and ``Error:`` lines; this prints one line
        in every case, so that logs and scripts see the same shape whatever went wrong.
        """
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else ExitCode.OK
        except _CommandError as exc:
            _error(exc.message)
            code = exc.exit_code
        except _NO_ARGS as exc:
            exc.show()  # no command at all: the help is the useful answer
            code = ExitCode.USAGE
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else "credkeeper"
            _error(f"{exc.format_message()} (see '{path} --help')")
            code = exc.exit_code
        except click.ClickException as exc:
            _error(exc.format_message())
            code = exc.exit_code
        except click.Abort:
            _error("interrupted")
            code = ExitCode.INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - raised outside a command, e.g. while closing
            _error(describe(exc))
            code = exit_code_for(exc)
        if standalone_mode:
            sys.exit(code)
        return code


# click 8.2 made a bare group raise this (a UsageError carrying the help); 8.1 has no such class.
_NO_ARGS: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {})
)


def _error(message: str) -> None:
    click.echo(PREFIX + one_line(message), err=True)


def _warn(message: str) -> None:
    click.echo(_WARNING + one_line(message), err=True)


def _env(name: str) -> str:
    """The environment variable standing for the setting ``name``, for the help."""
    return ENVIRONMENT[name][0]


def _configure_logging(ctx: click.Context, *, debug: bool) -> None:
    """Route credkeeper's logs for this run: to stderr with ``--debug``, else nowhere.

    Without a handler, Python would print warnings on stderr by itself, and an error would
    then take two lines (the engine's warning and ours). The logs never contain tokens.
    """
    logger = logging.getLogger("credkeeper")
    handler: logging.Handler
    if debug:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        handler = logging.NullHandler()
    level = logger.level
    logger.addHandler(handler)
    if debug:
        logger.setLevel(logging.DEBUG)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    ctx.call_on_close(restore)


@click.group(
    name="credkeeper",
    cls=_Group,
    epilog=epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--store",
    metavar="URL",
    help=f"The credential store [env {_env('store')}; default: an encrypted file, "
    "$XDG_DATA_HOME/credkeeper/credentials.json or ~/.local/share/credkeeper/credentials.json].",
)
@click.option(
    "--keys",
    metavar="KEYS|@FILE",
    help="The key ring sealing the tokens: key text as `credkeeper keygen` prints it, or "
    "@FILE (also any value containing '/' or starting with '~' or '.') for a key file "
    f"[env {_env('keys')}].",
)
@click.option(
    "--codec",
    metavar="MODULE:FACTORY",
    help="The application's own cipher for the stored tokens: FACTORY(), from the importable "
    "MODULE, returns its credkeeper.TokenCodec; tokens are then written as the application "
    f"writes them, and --keys seals only the rescue journal [env {_env('codec')}].",
)
@click.option(
    "--provider",
    metavar="PROFILE[+URL]|URL",
    help="The token endpoint: claude-code, wrapper-guide, or PROFILE+URL with the profile's "
    "options in the URL's query (oauth2+https://HOST/PATH?client_id=ID for any RFC 6749 "
    f"endpoint; profiles: {', '.join(SETTING_PROFILES)}); a bare URL speaks Claude Code's "
    f"protocol. An oauth2 client secret is read from {_env('client_secret')} only "
    f"[env {_env('provider')}; default: claude-code].",
)
@click.option(
    "--wrapper-url",
    metavar="URL",
    help=f"The Claude Wrapper API's base URL [env {_env('wrapper_url')}; "
    f"default: {DEFAULT_WRAPPER_URL}].",
)
@click.option(
    "--journal",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help=f"The rescue journal's directory [env {_env('journal')}; default: "
    "$XDG_STATE_HOME/credkeeper/journal or ~/.local/state/credkeeper/journal].",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs on stderr.")
@click.version_option(__version__, "-V", "--version", prog_name="credkeeper")
@click.pass_context
def cli(
    ctx: click.Context,
    store: str | None,
    keys: str | None,
    codec: str | None,
    provider: str | None,
    wrapper_url: str | None,
    journal: Path | None,
    debug: bool,
) -> None:
    """Keep rotating OAuth credentials fresh: one provider refresh per expiry, none lost.

    Commands that touch tokens (import, refresh, send) need a key ring, unless --codec gives
    the application's own cipher or the store is declared plaintext; rekey always needs one,
    and status none.
    """
    _configure_logging(ctx, debug=debug)
    # The options replace their variables; Settings reads the rest, as TokenManager.from_env().
    settings = Settings.from_env(
        store=store,
        keys=keys,
        codec=codec,
        provider=provider,
        wrapper_url=wrapper_url,
        journal=journal,
    )
    options = GlobalOptions(settings, debug=debug)
    ctx.obj = options
    ctx.call_on_close(options.close)


def _console(*, soft_wrap: bool = True) -> Console:
    # Created per command so it writes to the stdout of the moment (CliRunner swaps it);
    # rich drops colours and redrawing by itself when stdout is not a terminal.
    return Console(highlight=False, soft_wrap=soft_wrap)


# -- commands ------------------------------------------------------------------------------


_Command = TypeVar("_Command", bound=Callable[..., Any])


def _how_many(name: str, default: int, help: str) -> Callable[[_Command], _Command]:
    """An option counting things done at once: a whole number from 1 to 256."""
    return click.option(
        name, type=click.IntRange(1, 256), default=default, show_default=True, help=help
    )


@cli.command(short_help="Run many workers through several expiries, all local.")
@_how_many("--workers", 32, "Concurrent worker threads.")
@click.option(
    "--seconds",
    type=click.FloatRange(1.0, 600.0),
    default=5.0,
    show_default=True,
    help="How long the workers run.",
)
def demo(workers: int, seconds: float) -> None:
    """Refresh through several expiries: a fake provider, an encrypted file store, many workers.

    Everything runs locally in a temporary directory; the global options are not used.
    Exits 0 only when every call succeeded with one provider refresh per expiry.
    """
    result = run_demo(workers=workers, seconds=seconds, console=_console())
    if not result.ok:
        raise click.exceptions.Exit(ExitCode.FAILURE)


@cli.command("import", short_help="Store a login's credentials under a key.")
@click.option("--key", required=True, help="The key to store the credential under (a user id).")
@click.option(
    "--from-file",
    "source",
    type=click.Path(dir_okay=False, allow_dash=True),
    metavar="PATH",
    help=f"A credentials file; '-' reads stdin [default: {_CLAUDE_CODE_FILE}].",
)
@click.option("--stdin", is_flag=True, help="Read the credentials from stdin (same as '-').")
@click.argument(
    "path", required=False, type=click.Path(dir_okay=False, allow_dash=True), metavar="[PATH|-]"
)
@pass_options
def import_(
    options: GlobalOptions, key: str, source: str | None, stdin: bool, path: str | None
) -> None:
    """Store a login's credentials under --key, replacing what is there.

    Reads Claude Code's credentials file ({"claudeAiOauth": {...}}) or the wrapper's
    oauth_credentials JSON (the object, or a document holding it), from PATH (the same as
    --from-file) or, with '-' or --stdin, from standard input.
    """
    if sum((stdin, source is not None, path is not None)) > 1:
        raise click.UsageError("give one of PATH, --from-file and --stdin")
    source = source if path is None else path
    manager = options.manager()  # a missing key ring is reported before any input is read
    if stdin or source == "-":
        origin = "standard input"
        data = sys.stdin.buffer.read(_MAX_INPUT + 1)
    else:
        file = Path(source or _CLAUDE_CODE_FILE).expanduser()
        origin = str(file)
        data = _read_input(file)
    credentials = _parse_credentials(data, origin)
    manager.put(key, credentials)
    now = datetime.now(UTC)
    details = [f"access token {expiry_phrase(credentials.expires_at, now=now)}"]
    if credentials.scopes:
        details.append(f"scopes {' '.join(credentials.scopes)}")
    if credentials.subscription_type:
        details.append(f"subscription {credentials.subscription_type}")
    click.echo(f"imported {key!r} into {options.store_display}: {', '.join(details)}")


def _read_input(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_INPUT + 1)
    except OSError as exc:
        raise CredentialsError(
            f"cannot read credentials from {path}: {exc.strerror or type(exc).__name__}"
        ) from None


def _parse_credentials(data: bytes, origin: str) -> Credentials:
    """Credentials from Claude Code's document or the wrapper's, whichever ``data`` holds."""
    if len(data) > _MAX_INPUT:
        raise CredentialsError(f"{origin} holds more than {_MAX_INPUT} bytes; not credentials")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # Never quote the input or the parser's message: the input holds tokens.
        raise CredentialsError(f"{origin} is not valid JSON") from None
    parse: Callable[[Any], Credentials] = (
        Credentials.from_claude_code
        if isinstance(document, dict) and "claudeAiOauth" in document
        else Credentials.from_wrapper
    )
    try:
        return parse(document)
    except CredentialsError as exc:
        raise CredentialsError(f"cannot import from {origin}: {exc}", field=exc.field) from None


@cli.command(short_help="List stored credentials and their state; never a token.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@pass_options
def status(options: GlobalOptions, as_json: bool) -> None:
    """List every stored credential: expiry, status, lease holder, failures. Never a token.

    Needs no key ring: only the non-secret fields of each record are read. Damaged records are
    named on stderr and make the exit code 4; the rescue journal's problems are warnings there.
    """
    records, damaged = load_records(options.store())
    problems = _journal_problems(options)
    now = datetime.now(UTC)
    if as_json:
        click.echo(json.dumps([record_json(record, now=now) for record in records], indent=2))
    else:
        console = _console(soft_wrap=False)
        where = escape(options.store_display)
        if records:
            console.print(f"{len(records)} credential(s) in {where}")
            console.print(status_table(records, now=now))
        elif damaged:
            console.print(f"no readable credentials in {where}")
        else:
            console.print(f"no credentials in {where}")
    for problem in problems:
        _warn(problem)
    _report_damaged(damaged)


def _journal_problems(options: GlobalOptions) -> list[str]:
    """The rescue journal's problems, its entries checked against the key ring if one is given.

    Without ``--keys`` the journal is checked as the command line would use it, with its own key
    file; entries sealed by an application's key ring then show as sealed under a foreign key.
    """
    keyring = None
    if options.keys and options.keys.strip():
        try:
            keyring = options.keyring()
        except ConfigurationError as exc:
            return [f"the rescue journal was not checked: {exc}"]
    directory = options.journal or default_journal_dir()
    return RescueJournal(directory, keyring=keyring).problems()


@cli.command(short_help="Refresh one credential now.")
@click.argument("key")
@pass_options
def refresh(options: GlobalOptions, key: str) -> None:
    """Refresh the credential under KEY now, through the store's lease; print its new expiry."""
    credentials = options.manager().refresh(key)
    expires = credentials.expires_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    now = datetime.now(UTC)
    click.echo(
        f"refreshed {key!r}: the new access token "
        f"{expiry_phrase(credentials.expires_at, now=now)} ({expires})"
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class _Duration(click.ParamType[timedelta]):
    """``90s``, ``30m``, ``2h``, ``1d`` or a plain number of seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        unit = _UNITS.get(text[-1:]) if text else None
        number = text[:-1] if unit is not None else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            seconds = -1.0
        if not (seconds >= 0 and seconds < 10 * 365 * 86400):
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 2h or 1d", param, ctx)
        return timedelta(seconds=seconds)


DURATION = _Duration()


@cli.command(short_help="Refresh every credential due soon, before its user waits.")
@click.option(
    "--window",
    type=DURATION,
    help="Refresh credentials expiring within this [default: the leeway (15m) plus 15m].",
)
@_how_many("--concurrency", 8, "Refreshes at once.")
@click.option("--watch", is_flag=True, help="Sweep again every --interval until SIGTERM/SIGINT.")
@click.option(
    "--interval",
    type=DURATION,
    default="60s",
    show_default=True,
    help="With --watch, the time between sweeps.",
)
@click.option(
    "--keep-alive",
    type=DURATION,
    help="Also refresh credentials last refreshed longer ago than this (e.g. 30d), for "
    "providers that expire unused refresh tokens; with --watch, checked at most once per "
    "tenth of it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print each sweep's report as JSON.")
@pass_options
def sweep(
    options: GlobalOptions,
    window: timedelta | None,
    concurrency: int,
    watch: bool,
    interval: timedelta,
    keep_alive: timedelta | None,
    as_json: bool,
) -> None:
    """Refresh, through the store's leases, every credential expiring within the window.

    Any number of sweeps on any number of hosts, beside live traffic, refresh each credential
    once. Credentials whose user must log in again are listed and never retried; a throttling
    provider slows the sweep down instead of failing it. Exits 1 when a refresh failed.

    With --keep-alive, credentials whose tokens were last obtained longer ago than that (or at
    an unknown time) are refreshed too, so that a user idle for long is not logged out by a
    provider that expires unused refresh tokens. Finding them reads every record, so with
    --watch that pass runs in the first sweep and then at most once per tenth of --keep-alive.
    """
    if watch and interval < timedelta(seconds=1):
        raise click.BadParameter("must be at least 1s", param_hint="'--interval'")
    if keep_alive is not None and keep_alive < timedelta(seconds=1):
        raise click.BadParameter("must be at least 1s", param_hint="'--keep-alive'")
    sweeper = Sweeper(
        options.manager(), window=window, concurrency=concurrency, keep_alive=keep_alive
    )
    console = _console()
    failed = False

    def report(result: SweepReport) -> None:
        nonlocal failed
        failed = failed or not result.ok
        if as_json:
            click.echo(json.dumps(result.as_dict()))
        else:
            console.print(sweep_summary(result))

    if watch:
        sweeper.run_forever(interval=interval, on_report=report)
    else:
        with sweep_progress(console, enabled=not as_json) as progress:
            report(sweeper.run_once(progress=progress))
    if failed:
        raise SystemExit(ExitCode.FAILURE)


@cli.command(short_help="Send a prompt as KEY and stream the reply.")
@click.argument("key")
@click.argument("prompt")
@click.option("--model", default="sonnet", show_default=True, help="opus, sonnet, haiku or an id.")
@click.option("--thinking/--no-thinking", default=None, help="Extended thinking on or off.")
@click.option("--keepalive", is_flag=True, help="Use the wrapper's SSE endpoint.")
@pass_options
def send(
    options: GlobalOptions,
    key: str,
    prompt: str,
    model: str,
    thinking: bool | None,
    keepalive: bool,
) -> None:
    """Send PROMPT ('-' reads stdin) to the wrapper as the user under KEY; stream the reply."""
    if prompt == "-":
        prompt = sys.stdin.read()
    history = [{"role": "user", "content": prompt}]
    with (
        WrapperClient(options.manager(), base_url=options.wrapper_url) as client,
        client.messages.stream(
            key, history, model=model, thinking=thinking, keepalive=keepalive
        ) as stream,
    ):
        for text in stream.text_deltas():
            click.echo(text, nl=False)
    click.echo()


@cli.command(short_help="Make a new key ring, or rotate a key file.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the new ring to FILE (mode 0600) instead of stdout.",
)
@click.option("--force", is_flag=True, help="Let --output replace an existing FILE.")
@click.option(
    "--add-to",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Rotate: put a new primary key first in the key file FILE, keeping the others.",
)
@click.option("--key-id", metavar="ID", help="The new key's id [default: k + 8 hex digits].")
def keygen(output: Path | None, force: bool, add_to: Path | None, key_id: str | None) -> None:
    """Make a new 256-bit key: print a key ring, write it to a file, or rotate a key file.

    This prints key material (to stdout only): keep it out of shell history and logs.
    """
    if add_to is not None and output is not None:
        raise click.UsageError("--add-to rewrites its file in place; it does not take --output")
    if force and output is None:
        raise click.UsageError("--force only applies to --output")
    if add_to is not None:
        _add_key(add_to.expanduser(), key_id)
        return
    ring = KeyRing.generate(key_id)
    if output is None:
        click.echo(ring.export())
        return
    output = output.expanduser()
    if output.exists() and not force:
        raise click.BadParameter(
            f"{output} already exists; pass --force to replace it (its keys would be lost)",
            param_hint="'--output'",
        )
    _write_private(output, ring.export() + "\n", replace=force)
    click.echo(
        f"wrote a key ring with key {ring.primary_id} to {output} (mode 0600); "
        f"use it with CREDKEEPER_KEYS=@{output}"
    )


def _add_key(path: Path, key_id: str | None) -> None:
    ring = KeyRing.from_file(path)  # refuses a file others can read, as every reader would
    rotated = ring.rotated(key_id)
    original = path.read_text(encoding="utf-8-sig")
    # Prepend the new line to the file as it is, so its comments and layout survive.
    new_line = rotated.export().splitlines()[0]
    text = f"{new_line}\n{original}"
    if not text.endswith("\n"):
        text += "\n"
    if KeyRing.parse(text).key_ids != rotated.key_ids:
        raise ConfigurationError(f"key file {str(path)!r} did not read back as the rotated ring")
    _write_private(path, text, replace=True)
    click.echo(
        f"added key {rotated.primary_id} as the primary key of {path} "
        f"(keys: {', '.join(rotated.key_ids)}); give every writer this ring, "
        "then run `credkeeper rekey`"
    )


def _write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path``, mode 0600; without ``replace``, never over an existing file."""
    make_private_directories(path.parent)
    if not replace:
        # O_EXCL: a file appearing since the caller's check is refused, not overwritten.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        _write_fd(fd, text)
        return
    # A temp file and a rename: a crash leaves the old keys or the new ones, never half a file.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _write_fd(fd, text)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _write_fd(fd: int, text: str) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        # The umask may have taken bits off 0600; the mode must be exactly this, not less usable.
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@cli.command("rekey", short_help="Re-seal every stored token under the primary key.")
@pass_options
def rekey_command(options: GlobalOptions) -> None:
    """Re-seal every stored token under the key ring's primary key (after a rotation).

    Run it once every writer has the new ring; records are written by compare-and-swap, so
    refreshes running meanwhile are never overwritten. With --codec, the codec must be a key
    ring: an application's own cipher is the application's to rotate.
    """
    codec = options.token_codec()
    if codec is not None and not isinstance(codec, KeyRing):
        raise ConfigurationError(
            f"rekey re-seals tokens under the primary key of a credkeeper key ring, but --codec "
            f"(CREDKEEPER_CODEC) {options.codec!r} gives the application's own cipher "
            f"({type(codec).__name__}); rotate that cipher's secret with the application's own "
            "tools, and run rekey without --codec only on stores sealed with the key ring"
        )
    keyring = codec if codec is not None else options.keyring()
    report = rekey(options.store(), keyring)
    click.echo(
        f"re-sealed {report.rekeyed} record(s) under key {keyring.primary_id}; "
        f"{report.unchanged} already under it"
    )
    _report_damaged(report.damaged)


def _report_damaged(damaged: Mapping[str, str]) -> None:
    """Name each damaged record on stderr, then end the command with exit code 4."""
    for key, reason in damaged.items():
        _error(
            f"skipped the damaged record under key {key!r}: {reason}; repair or remove that "
            f"record in the store, then run `credkeeper import --key {shlex.quote(key)}`"
        )
    if damaged:
        raise click.exceptions.Exit(ExitCode.STORE)


@cli.command(short_help="Show one credential's state; never a token.")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
@pass_options
def show(options: GlobalOptions, key: str, as_json: bool) -> None:
    """Show the state of the credential under KEY: its row of `status`, and when its tokens
    were last refreshed. Never a token.

    Needs no key ring. --json prints the object `status --json` lists for the key.
    Exits 6 when no credential is stored under KEY.
    """
    record = options.store().get(check_key(key))
    if record is None:
        raise CredentialNotFound(key)
    now = datetime.now(UTC)
    if as_json:
        click.echo(json.dumps(record_json(record, now=now), indent=2))
    else:
        console = _console(soft_wrap=False)
        console.print(status_table([record], now=now))
        console.print(last_refresh_line(record, now=now))


@cli.command(short_help="Delete one credential, after asking.")
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
@pass_options
def delete(options: GlobalOptions, key: str, yes: bool) -> None:
    """Delete the credential under KEY, after asking for confirmation (not with --yes).

    With a key ring, --codec or a store declared plaintext it is deleted as the library
    deletes it, which also drops the key's entries from the rescue journal; otherwise only the
    store's record is, as it is for a damaged record. Without a terminal to ask on,
    --yes is required. Exits 6 when no credential is stored under KEY, 1 when the answer is no.
    """
    store = options.store()
    try:
        if store.get(check_key(key)) is None:
            raise CredentialNotFound(key)
        damaged = False
    except StoreCorrupted:
        # Deleting a damaged record is often the fix; the manager reads a record before it
        # deletes it, so only the store can.
        damaged = True
    if not yes:
        if not (sys.stdin and sys.stdin.isatty()):
            raise click.UsageError(
                "standard input is not a terminal to ask on; pass --yes to delete without asking"
            )
        question = f"Delete the credential under key {key!r} from {options.store_display}?"
        if not click.confirm(question):
            click.echo(f"kept {key!r}: nothing deleted")
            raise click.exceptions.Exit(ExitCode.FAILURE)
    through_manager = not damaged and (
        options.keys is not None or options.codec is not None or declares_plaintext(store)
    )
    deleted = options.manager().delete(key) if through_manager else store.delete(key)
    if not deleted:  # deleted by someone else while we asked
        raise CredentialNotFound(key)
    what = "damaged record" if damaged else "credential"
    entries = " and its rescue-journal entries" if through_manager else ""
    click.echo(f"deleted the {what} under key {key!r}{entries} from {options.store_display}")
    if through_manager:
        return
    journal = RescueJournal(options.journal or default_journal_dir())
    if journal.count_pending():
        # Without the record's tokens open, its entries cannot be told from another store's.
        click.echo(
            f"{_WARNING}the rescue journal in {journal.directory} was left as it is: without "
            "the record's tokens (--keys or --codec) its entries cannot be matched to it",
            err=True,
        )


@cli.command(short_help="Write every record as JSON lines, tokens as stored, for backup.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write to FILE (mode 0600) instead of stdout.",
)
@click.option("--force", is_flag=True, help="Let --output replace an existing FILE.")
@pass_options
def export(options: GlobalOptions, output: Path | None, force: bool) -> None:
    """Write every stored record as one JSON object a line, for backup.

    Each line holds the key and the record's fields as document stores keep them (times in
    epoch milliseconds). Tokens are written exactly as stored: sealed with the key ring or the
    application's codec, or in clear for a store declared plaintext; keep the output as safe as
    the store. Needs no key ring. The count goes to stderr; damaged records are named there
    and make the exit code 4. `migrate` is the way to copy credentials into another store.
    """
    if force and output is None:
        raise click.UsageError("--force only applies to --output")
    store = options.store()
    records, damaged = load_records(store)
    text = "".join(
        json.dumps({"key": record.key, **record.to_document()}) + "\n" for record in records
    )
    if output is None:
        click.echo(text, nl=False)
        where = "standard output"
    else:
        output = output.expanduser()
        if output.exists() and not force:
            raise click.BadParameter(
                f"{output} already exists; pass --force to replace it", param_hint="'--output'"
            )
        _write_private(output, text, replace=force)
        where = f"{output} (mode 0600)"
    clear = ""
    if declares_plaintext(store):
        clear = "; the store is declared plaintext: its tokens are in clear"
    click.echo(
        f"exported {len(records)} record(s) from {options.store_display} to {where}{clear}",
        err=True,
    )
    _report_damaged(damaged)


@cli.command("migrate", short_help="Copy every credential to another store; resumable.")
@click.option(
    "--to",
    "to_url",
    required=True,
    metavar="URL",
    help="The destination store: any URL --store takes.",
)
@click.option(
    "--to-keys",
    metavar="KEYS|@FILE",
    help="Re-seal the tokens under this key ring's primary key, read as --keys is; --keys "
    "(or a --codec key ring) opens the source's tokens [default: copy tokens as stored].",
)
@_how_many("--concurrency", 8, "Credentials copied at once.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_options
def migrate_command(
    options: GlobalOptions, to_url: str, to_keys: str | None, concurrency: int, as_json: bool
) -> None:
    """Copy every credential from --store to the store at URL, with its state.

    Each record is written by compare-and-swap, and a credential the destination holds newer
    (a later expiry, or other tokens at the same expiry) is kept: running it again is safe and
    finishes a run that was cut off. Status, failures and cooldown are copied; leases are not.
    A damaged record is named and skipped. Exits 1 when a credential was not copied.
    """
    for name, value in (("--to", to_url), ("--to-keys", to_keys)):
        if value is not None and not value.strip():
            raise click.BadParameter("must not be empty", param_hint=f"'{name}'")
    target = GlobalOptions(
        dataclasses.replace(options.settings, store=to_url, keys=to_keys), debug=options.debug
    )
    if target.settings.store_url == options.settings.store_url:
        raise click.BadParameter("names the source store (--store) itself", param_hint="'--to'")
    with contextlib.closing(target):
        reseal = None if to_keys is None else _migration_ring(options, target.keyring())
        source, destination = options.store(), target.store()
        console = _console()
        with progress_bar(console, "migrating", enabled=not as_json) as progress:
            report = migrate(
                source, destination, reseal=reseal, progress=progress, concurrency=concurrency
            )
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        console.print(
            migrate_summary(report, source=options.store_display, destination=target.store_display)
        )
    if not report.ok:
        raise click.exceptions.Exit(ExitCode.FAILURE)


def _migration_ring(options: GlobalOptions, destination: KeyRing) -> KeyRing:
    """The ring re-sealing under ``destination``'s primary key that opens the source's tokens.

    The source's ring is --keys, or a --codec that is a key ring; without either, only tokens
    stored in clear can be re-sealed, and a sealed one stops the run naming its record.
    """
    codec = options.token_codec()
    if codec is not None and not isinstance(codec, KeyRing):
        raise ConfigurationError(
            f"--to-keys re-seals tokens sealed with a credkeeper key ring, but --codec "
            f"(CREDKEEPER_CODEC) {options.codec!r} gives the application's own cipher "
            f"({type(codec).__name__}); migrate without --to-keys to copy its tokens as stored"
        )
    source = codec if codec is not None else options.keyring() if options.keys else None
    return destination if source is None else _joined(destination, source)


def _joined(primary: KeyRing, other: KeyRing) -> KeyRing:
    """``primary``'s keys, then those of ``other`` it lacks: it seals as ``primary`` does and
    opens what either ring sealed."""
    lines = primary.export().splitlines()
    for line in other.export().splitlines():
        key_id = line.partition(":")[0]
        if key_id not in primary.key_ids:
            lines.append(line)
        elif line not in lines:
            raise ConfigurationError(
                f"--keys and --to-keys both hold a key named {key_id!r}, with different key "
                "material; give one of them another id"
            )
    return KeyRing.parse("\n".join(lines))


@cli.command("init-store", short_help="Create a SQL store's tables if they are missing.")
@click.argument("url", metavar="URL")
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing: show the mapping the store will use, and what is missing, with the fix.",
)
def init_store_command(url: str, check: bool) -> None:
    """Create credkeeper's tables in the SQL database at URL, where they are missing.

    URL is a SQLAlchemy URL (sqlite:///path, postgresql+psycopg://..., mysql+pymysql://...) whose
    query may hold the store's options: ?table=NAME, ?schema=NAME, or for credentials kept in
    an existing table ?table=users&key_column=...&lease_table=NAME. Idempotent: it creates only
    what is missing. To credkeeper's own tables made by an older credkeeper it adds the nullable
    columns this one keeps (refreshed_at); it never alters the application's tables, and never
    drops anything. The global options are not used.

    With --check it reflects the live tables and prints each field's column, type and format,
    the tables and the index scan_due needs, then exits 2 with the fixes if anything is wrong.
    """
    if check:
        _print_check(_sql_module(url).check_store(url))
        return
    shown = display_url(url)
    sql = _sql_module(url)
    created = sql.init_store(url)
    added = sql.upgrade_store(url)
    if created:
        noun = "table" if len(created) == 1 else "tables"
        click.echo(f"created {noun} {', '.join(created)} in {shown}")
    if added:
        noun = "column" if len(added) == 1 else "columns"
        click.echo(f"added {noun} {', '.join(added)} in {shown}")
    if not created and not added:
        click.echo(f"credkeeper's tables already exist in {shown}; nothing to create")


def _print_check(report: StoreCheck) -> None:
    """``init-store --check``'s report; exit 2 when something must be fixed first."""
    console = _console(soft_wrap=False)
    console.print(escape(report.where))
    if report.fields:
        console.print(mapping_table(report.fields))
    for name, exists in report.tables:
        console.print(f"table {escape(name)}: {'exists' if exists else 'missing'}")
    for name, exists in report.indexes:
        console.print(f"index on {escape(name)}: {'exists' if exists else 'missing'}")
    for problem in report.problems:
        _error(problem)
    if report.problems:
        raise click.exceptions.Exit(ExitCode.USAGE)
    console.print("ready: nothing to fix")


def _sql_module(url: str) -> Any:
    """The ``credkeeper_sql`` package, once the URL is known to name a SQL database."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if KNOWN_SCHEMES.get(scheme.split("+", 1)[0]) != "sql":
        raise ConfigurationError(
            f"init-store sets up SQL stores only (sqlite, postgresql, mysql and mariadb URLs), "
            f"not {display_url(url)!r}; other stores need no setup"
        )
    try:
        # The SQL store and SQLAlchemy load only for this command, and only if installed.
        import credkeeper_sql  # noqa: PLC0415
    except ImportError as exc:
        raise UnknownSchemeError(
            f"the SQL store failed to import ({exc.name or exc}); "
            "install it with pip install 'credkeeper[sql]'",
            scheme=scheme,
        ) from exc
    return credkeeper_sql


cli.add_command(apikey)
cli.add_command(serve)


def main(args: Sequence[str] | None = None) -> int:
    """Run ``credkeeper`` with ``args`` (default: the process's); return the exit code.

    The console script and ``python -m credkeeper`` call this and exit with its result.
    """
    return int(cli.main(args, prog_name="credkeeper", standalone_mode=False))
