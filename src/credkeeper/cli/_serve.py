"""``credkeeper serve``: the HTTP service on uvicorn, from the global options' settings.

FastAPI and uvicorn come with the ``server`` extra and are imported only when the command runs,
so the rest of the command line works without them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from credkeeper._exceptions import ConfigurationError
from credkeeper._urls import LOOPBACK

from ._options import GlobalOptions, pass_options

__all__ = ["serve"]

DEFAULT_LISTEN = "127.0.0.1:8080"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port; ConfigurationError if not."""
    host, colon, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"--listen must be HOST:PORT such as {DEFAULT_LISTEN}, got {value!r}"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command(short_help="Run the HTTP service: credentials and wrapper calls for any language.")
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="Where to listen; an address other than loopback needs --api-keys.",
)
@click.option(
    "--api-keys",
    "api_keys_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="CREDKEEPER_API_KEYS_FILE",
    metavar="FILE",
    help="The API keys callers authenticate with, as `credkeeper apikey create` writes them "
    "[env CREDKEEPER_API_KEYS_FILE]; without it no request is authenticated.",
)
@click.option(
    "--sweep/--no-sweep",
    default=True,
    show_default=True,
    help="Refresh credentials in the background before they are needed.",
)
@click.option(
    "--webhook",
    "webhook_urls",
    multiple=True,
    metavar="URL",
    help="Where to POST credential.needs_reauth, credential.recovered and credential.deleted "
    "events, signed per Standard Webhooks; repeatable. Needs --webhook-secret.",
)
@click.option(
    "--webhook-secret",
    envvar="CREDKEEPER_WEBHOOK_SECRET",
    metavar="SECRET",
    help="The whsec_... secret webhooks are signed with, or @FILE to read it from a file "
    "(a value on the command line shows in the process list) [env CREDKEEPER_WEBHOOK_SECRET].",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Append the audit log (one JSON line per credential read, write, delete or forced "
    "refresh) to FILE instead of standard error.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(1),
    default=1_048_576,
    show_default=True,
    help="The largest request body accepted; larger ones get 413.",
)
@click.option(
    "--shutdown-timeout",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    metavar="SECONDS",
    help="On SIGTERM, how long requests still running (a wrapper call can take minutes) may "
    "finish before they are cut; refreshes they started finish and are stored regardless.",
)
@pass_options
def serve(
    options: GlobalOptions,
    listen: str,
    api_keys_file: Path | None,
    sweep: bool,
    webhook_urls: tuple[str, ...],
    webhook_secret: str | None,
    audit_log: Path | None,
    max_body_bytes: int,
    shutdown_timeout: int,
) -> None:
    """Serve credentials and Claude Wrapper API calls over HTTP, from the global options' store,
    key ring, provider, journal and wrapper URL.

    Listening beyond loopback needs --api-keys: every route but /healthz, /readyz and the API
    document then asks for 'Authorization: Bearer <key>'. Stops on SIGTERM or Ctrl-C: requests
    still running get --shutdown-timeout to finish, then the refreshes in flight finish and the
    webhooks pending are delivered (for at most 10 s).
    """
    host, port = parse_listen(listen)
    if api_keys_file is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without API keys: anyone who reaches it could read "
            "every credential; pass --api-keys FILE (create keys with `credkeeper apikey "
            "create`), or listen on 127.0.0.1"
        )
    try:
        import uvicorn  # noqa: PLC0415

        from credkeeper.server import ApiKeys, Webhooks, create_app  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigurationError(
            f"credkeeper serve needs {exc.name or 'fastapi and uvicorn'}; "
            "install it with pip install 'credkeeper[server]'"
        ) from exc
    if webhook_urls and not webhook_secret:
        raise ConfigurationError(
            "--webhook needs --webhook-secret (or CREDKEEPER_WEBHOOK_SECRET) to sign with; "
            'make one with: echo "whsec_$(openssl rand -base64 32)"'
        )
    if webhook_secret and webhook_secret.startswith("@"):
        webhook_secret = _read_secret(Path(webhook_secret[1:]).expanduser())
    api_keys = ApiKeys.load(api_keys_file) if api_keys_file is not None else None
    settings = options.settings
    # Checked before anything starts; a Webhooks binds to its loop only when started.
    webhooks = Webhooks(webhook_urls, secret=webhook_secret or "") if webhook_urls else None
    _log_to(audit_log)

    async def run() -> None:
        # Made inside the loop that serves: an asyncio manager belongs to one loop.
        from credkeeper._wrapper import AsyncWrapperClient  # noqa: PLC0415

        manager = settings.async_manager()
        async with manager, AsyncWrapperClient(manager, base_url=settings.wrapper_url) as wrapper:
            app = create_app(
                manager=manager,
                wrapper=wrapper,
                api_keys=api_keys,
                max_body_bytes=max_body_bytes,
                sweep=sweep,
                webhooks=webhooks,
            )
            config: Any = uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level="info",
                server_header=False,
                timeout_graceful_shutdown=shutdown_timeout,
            )
            await uvicorn.Server(config).serve()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(run())


def _log_to(audit_log: Path | None) -> None:
    """credkeeper's own log at INFO on standard error beside uvicorn's, and the audit log on
    its own handler: standard error, or ``audit_log`` appended to."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    root = logging.getLogger("credkeeper")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    audit = logging.getLogger("credkeeper.audit")
    sink: logging.Handler = (
        logging.StreamHandler(sys.stderr)
        if audit_log is None
        else logging.FileHandler(audit_log, encoding="utf-8")
    )
    # The lines are JSON already: nothing around them, so each can be parsed as it is.
    sink.setFormatter(logging.Formatter("%(message)s"))
    audit.addHandler(sink)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def _read_secret(path: Path) -> str:
    """The webhook secret in ``path``, stripped; a ConfigurationError naming it if unreadable."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"--webhook-secret @{path}: cannot read the file ({type(exc).__name__}); "
            "give the path of a file holding the whsec_... secret"
        ) from None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the server extra brings it), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.new_event_loop
