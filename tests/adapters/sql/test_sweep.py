"""Three `credkeeper sweep` processes started together on one PostgreSQL store refresh each due
credential exactly once, counted by the provider itself (which revokes a family on reuse)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from credkeeper import KeyRing, TokenManager, open_store
from credkeeper.testing import FakeProvider

from .conftest import _with_table

DUE = 60


@pytest.fixture
def sweep_store_url(postgres_url: str) -> Iterator[str]:
    """A table of its own: a sweep takes every due row of its table, other tests' included."""
    yield from _with_table(postgres_url, f"ck_sweep_{uuid.uuid4().hex[:8]}")


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(3))
def test_three_sweep_processes_refresh_each_due_credential_once(
    repetition: int, sweep_store_url: str, tmp_path: Path
) -> None:
    """60 due credentials, 3 processes x 8 threads: 60 provider refreshes, one per family."""
    keyring = KeyRing.generate()
    keys = tmp_path / "keys"
    keys.write_text(keyring.export())
    keys.chmod(0o600)
    with FakeProvider(latency=0.05, revoke_family_on_reuse=True) as fake:
        store = open_store(sweep_store_url)
        with TokenManager(store, fake.provider(), keyring=keyring, journal=tmp_path / "j") as m:
            for n in range(DUE):
                m.put(f"user-{n}", fake.issue(expires_in=60))
            m.put("later", fake.issue(expires_in=8 * 3600))
        command = [
            sys.executable,
            "-m",
            "credkeeper",
            "--store",
            sweep_store_url,
            "--keys",
            f"@{keys}",
            "--provider",
            fake.token_url,
        ]
        workers = [
            subprocess.Popen(
                [*command, "--journal", str(tmp_path / f"journal-{n}"), "sweep", "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(3)
        ]
        outputs = [worker.communicate(timeout=120) for worker in workers]

        reports = [json.loads(out) for out, _ in outputs]
        assert [0, 0, 0] == [worker.returncode for worker in workers], [e for _, e in outputs]
        assert DUE == fake.refresh_count
        ok = Counter(call.family for call in fake.refresh_calls if call.outcome == "ok")
        assert (DUE, {1}) == (len(ok), set(ok.values()))
        assert DUE == sum(report["refreshed"] for report in reports)
        assert [] == [failed for report in reports for failed in report["failed"]]
        # Each sweep accounts for every key it listed.
        assert [report["due"] for report in reports] == [
            report["refreshed"]
            + report["fresh"]
            + report["by_peer"]
            + report["deleted"]
            + len(report["needs_reauth"])
            + len(report["deferred"])
            + len(report["failed"])
            for report in reports
        ]
