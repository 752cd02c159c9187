"""The audit log: one JSON line per credential read, write, delete or forced refresh.

Lines go to the ``credkeeper.audit`` logger at INFO, apart from the access log, so that they
can be shipped and kept on their own terms (point a handler at that logger alone). A line says
when, which API key, which credential, what was asked and how it ended, and for tokens handed
out a short fingerprint of the access token: enough to match a leaked token to the request
that received it, never enough to recover it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

from credkeeper._credentials import Credentials

__all__ = ["AUDIT_LOGGER", "audit", "token_fingerprint"]

AUDIT_LOGGER = "credkeeper.audit"
logger = logging.getLogger(AUDIT_LOGGER)


def token_fingerprint(credentials: Credentials) -> str:
    """The first 16 hex digits of the access token's SHA-256: one-way, short, comparable."""
    token = credentials.access_token.get_secret_value().encode()
    return hashlib.sha256(b"credkeeper-audit\x00" + token).hexdigest()[:16]


def audit(
    *,
    action: str,
    api_key: str | None,
    key: str,
    route: str,
    status: int,
    outcome: str,
    credentials: Credentials | None = None,
) -> None:
    """Write one audit line: ``action`` (read, refresh, forced_refresh, write, delete) on
    credential ``key`` by ``api_key`` (its name; ``None`` when the service checks no keys),
    answered ``status`` with ``outcome`` (``ok`` or the problem's code)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    line = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "action": action,
        "api_key": api_key,
        "key": key,
        "route": route,
        "status": status,
        "outcome": outcome,
        "token_fingerprint": None if credentials is None else token_fingerprint(credentials),
    }
    logger.info(json.dumps(line, separators=(",", ":")), extra={"credkeeper_audit": line})
