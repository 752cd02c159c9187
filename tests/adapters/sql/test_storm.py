"""The process storm on PostgreSQL and MariaDB: 4 processes x 16 threads, exactly one refresh."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from credkeeper.testing import run_storm


def storm(url: str, directory: Path) -> tuple[object, ...]:
    report = run_storm(url, directory=directory, key=f"storm-{uuid.uuid4().hex[:8]}")
    return (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_storm_on_postgres_refreshes_once(
    repetition: int, postgres_store_url: str, tmp_path: Path
) -> None:
    """64 callers on PostgreSQL: 1 refresh, 0 errors, all hold the new token."""
    assert (1, ("ok",), (), 64, 64) == storm(postgres_store_url, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_storm_on_mariadb_refreshes_once(
    repetition: int, mysql_store_url: str, tmp_path: Path
) -> None:
    """64 callers on MariaDB: 1 refresh, 0 errors, all hold the new token."""
    assert (1, ("ok",), (), 64, 64) == storm(mysql_store_url, tmp_path)


@pytest.mark.slow
def test_storm_on_sqlite_refreshes_once(sqlite_store_url: str, tmp_path: Path) -> None:
    """64 callers on one SQLite file: 1 refresh, 0 errors, all hold the new token."""
    assert (1, ("ok",), (), 64, 64) == storm(sqlite_store_url, tmp_path)
