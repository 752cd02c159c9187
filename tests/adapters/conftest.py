"""What the store adapters' tests share, whatever the backend."""

from __future__ import annotations

from datetime import UTC, datetime

from credkeeper import Record


def record(key: str) -> Record:
    """A never-stored record under ``key``."""
    return Record(
        key=key,
        access_token="access",
        refresh_token="refresh",
        expires_at=datetime(2039, 1, 1, tzinfo=UTC),
    )
