"""A process killed between the provider's answer and the store write loses nothing."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from credkeeper import KeyRing, Provider, Record, TokenManager, open_store
from credkeeper.testing import FakeProvider
from credkeeper_file import FileStore

KEY = "user-crash"


class DyingStore(FileStore):
    """A file store whose process is SIGKILLed at the write of freshly refreshed tokens.

    Stands in for a crash at the worst moment: after the provider rotated the refresh token,
    before the store has it. No real store can be made to die at exactly that instruction.
    """

    def put(self, record: Record) -> Record:
        current = self.get(record.key)
        if current is not None and current.refresh_token != record.refresh_token:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().put(record)


def _doomed_worker(path: str, token_url: str, keys: str, journal: str) -> None:
    manager = TokenManager(
        DyingStore(path),
        Provider.claude_code(token_url=token_url),
        keyring=KeyRing.parse(keys),
        journal=journal,
    )
    manager.get(KEY)


class TestCrashBeforeStoreWrite:
    def test_next_start_restores_the_journalled_tokens_without_invalid_grant(
        self, tmp_path: Path
    ) -> None:
        """After SIGKILL at the store write, a new manager serves the provider's new tokens."""
        path = tmp_path / "credentials.json"
        journal = tmp_path / "journal"
        ring = KeyRing.generate()
        with FakeProvider(revoke_family_on_reuse=True) as fake:
            first = fake.issue(expires_in=0)
            with TokenManager(FileStore(path), fake.provider(), keyring=ring, journal=journal) as m:
                m.put(KEY, first)
            family = fake.family_of(first)
            assert family is not None

            context = multiprocessing.get_context("spawn")
            doomed = context.Process(
                target=_doomed_worker,
                args=(str(path), fake.token_url, ring.export(), str(journal)),
            )
            doomed.start()
            doomed.join(60)

            assert -signal.SIGKILL == doomed.exitcode
            assert ("ok",) == tuple(call.outcome for call in fake.refresh_calls)
            rescued = fake.current_credentials(family)
            with TokenManager(
                open_store(f"file://{path}"), fake.provider(), keyring=ring, journal=journal
            ) as restarted:
                restored = restarted.get(KEY)
                again = restarted.refresh(KEY)

            assert (rescued.access_token, rescued.refresh_token) == (
                restored.access_token,
                restored.refresh_token,
            )
            assert "valid" == fake.access_token_state(again.access_token)
            assert ("ok", "ok") == tuple(call.outcome for call in fake.refresh_calls)

    def test_journal_entry_is_removed_once_the_store_has_the_tokens(self, tmp_path: Path) -> None:
        """The rescue entry is deleted after it is replayed into the store."""
        path = tmp_path / "credentials.json"
        journal = tmp_path / "journal"
        ring = KeyRing.generate()
        with FakeProvider() as fake:
            with TokenManager(FileStore(path), fake.provider(), keyring=ring, journal=journal) as m:
                m.put(KEY, fake.issue(expires_in=0))
            doomed = multiprocessing.get_context("spawn").Process(
                target=_doomed_worker,
                args=(str(path), fake.token_url, ring.export(), str(journal)),
            )
            doomed.start()
            doomed.join(60)
            assert 1 == len(list(journal.glob("*.json")))

            with TokenManager(FileStore(path), fake.provider(), keyring=ring, journal=journal) as m:
                m.get(KEY)

            assert [] == list(journal.glob("*.json"))
