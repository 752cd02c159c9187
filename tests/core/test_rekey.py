"""rekey: every stored token re-sealed under the primary key, by compare-and-swap."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from credkeeper import ConflictError, DecryptionError, MemoryStore, Record, Status
from credkeeper._keyring import KeyRing
from credkeeper._rekey import RekeyReport, rekey

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
FIELDS = ("access_token", "refresh_token")


def make_record(key: str, ring: KeyRing | None, *, access: str, refresh: str) -> Record:
    """A new record whose tokens are sealed under ``ring``'s primary key, or plain without one."""
    if ring is not None:
        access = ring.seal(access, key=key, field="access_token")
        refresh = ring.seal(refresh, key=key, field="refresh_token")
    return Record(key=key, access_token=access, refresh_token=refresh, expires_at=EXPIRES)


def plaintexts(store: MemoryStore, ring: KeyRing, key: str) -> tuple[str, str]:
    """The access and refresh tokens stored under ``key``, opened with ``ring``."""
    record = store.get(key)
    assert record is not None
    return (
        ring.unseal(record.access_token, key=key, field="access_token"),
        ring.unseal(record.refresh_token, key=key, field="refresh_token"),
    )


def key_ids(store: MemoryStore, key: str) -> tuple[str, str]:
    """The key ids the tokens under ``key`` are sealed with."""
    record = store.get(key)
    assert record is not None
    return (record.access_token.split(":")[1], record.refresh_token.split(":")[1])


class InterleavingStore(MemoryStore):
    """A MemoryStore where another thread writes just before some of rekey's writes.

    The writer runs in its own thread and is joined before the intercepted write goes on,
    so the interleaving is real and yet happens at a known point.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conflicts = 0
        self._writer: Callable[[str], object] = lambda key: None
        self._remaining = 0
        self._intercepted: threading.Thread | None = None

    def interleave(self, writer: Callable[[str], object], *, times: int = 1) -> None:
        """Run ``writer(key)`` in another thread before the next ``times`` puts of this thread."""
        self._writer = writer
        self._remaining = times
        self._intercepted = threading.current_thread()

    def put(self, record: Record) -> Record:
        """Let the writer in first when armed, then compare-and-swap as usual."""
        if self._remaining and threading.current_thread() is self._intercepted:
            self._remaining -= 1
            writer = threading.Thread(target=self._writer, args=(record.key,))
            writer.start()
            writer.join(timeout=10)
        try:
            return super().put(record)
        except ConflictError:
            self.conflicts += 1
            raise


@pytest.fixture
def old() -> KeyRing:
    return KeyRing.generate("old")


@pytest.fixture
def new(old: KeyRing) -> KeyRing:
    return old.rotated("new")


class TestRekey:
    def test_everything_ends_under_primary(self, old: KeyRing, new: KeyRing) -> None:
        """Old-key, plain and current records all end up under the primary with their plaintext."""
        store = MemoryStore()
        store.put(make_record("sealed-old", old, access="a1", refresh="r1"))
        store.put(make_record("plain", None, access="a2", refresh="r2"))
        store.put(make_record("sealed-new", new, access="a3", refresh="r3"))

        report = rekey(store, new)

        assert RekeyReport(rekeyed=2, unchanged=1) == report
        assert [("new", "new")] * 3 == [key_ids(store, key) for key in store.scan_due(EXPIRES)]
        assert {"sealed-old": ("a1", "r1"), "plain": ("a2", "r2"), "sealed-new": ("a3", "r3")} == {
            key: plaintexts(store, new, key) for key in ("sealed-old", "plain", "sealed-new")
        }

    def test_second_run_changes_nothing(self, old: KeyRing, new: KeyRing) -> None:
        """A second run finds nothing to re-seal."""
        store = MemoryStore()
        store.put(make_record("sealed-old", old, access="a1", refresh="r1"))
        store.put(make_record("plain", None, access="a2", refresh="r2"))
        rekey(store, new)

        assert RekeyReport(rekeyed=0, unchanged=2) == rekey(store, new)

    def test_one_stale_field_reseals_record(self, old: KeyRing, new: KeyRing) -> None:
        """A record with only one token under an old key ends with both under the primary."""
        store = MemoryStore()
        stale = make_record("user", new, access="a", refresh="r")
        stale = stale.replace(refresh_token=old.seal("r", key="user", field="refresh_token"))
        store.put(stale)

        report = rekey(store, new)

        assert (RekeyReport(rekeyed=1, unchanged=0), ("new", "new")) == (
            report,
            key_ids(store, "user"),
        )
        assert ("a", "r") == plaintexts(store, new, "user")

    def test_other_fields_kept(self, old: KeyRing, new: KeyRing) -> None:
        """Rekeying changes the token ciphertexts and nothing else."""
        store = MemoryStore()
        original = make_record("user", old, access="a", refresh="r").replace(
            scopes=("user:inference",),
            subscription_type="max",
            status=Status.NEEDS_REAUTH,
            lease_owner="host-1",
            lease_until=EXPIRES,
            failures=2,
            last_error="invalid_grant",
        )
        store.put(original)

        rekey(store, new)

        stored = store.get("user")
        assert stored is not None
        ignored = {*FIELDS, "version"}
        assert {k: v for k, v in original.to_document().items() if k not in ignored} == {
            k: v for k, v in stored.to_document().items() if k not in ignored
        }

    def test_far_future_expiry_included(self, old: KeyRing, new: KeyRing) -> None:
        """A record expiring at the end of the calendar is rekeyed too."""
        store = MemoryStore()
        far = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
        store.put(make_record("user", old, access="a", refresh="r").replace(expires_at=far))

        assert RekeyReport(rekeyed=1, unchanged=0) == rekey(store, new)

    def test_empty_store(self, new: KeyRing) -> None:
        """An empty store gives an empty report."""
        assert RekeyReport(rekeyed=0, unchanged=0) == rekey(MemoryStore(), new)

    def test_unknown_key_names_record(self, new: KeyRing) -> None:
        """A token sealed under a key missing from the ring fails, naming the record only."""
        store = MemoryStore()
        store.put(make_record("user-7", KeyRing.generate("gone"), access="tok-a", refresh="tok-r"))

        with pytest.raises(DecryptionError, match="'user-7'") as caught:
            rekey(store, new)

        assert [] == [token for token in ("tok-a", "tok-r") if token in str(caught.value)]
        assert caught.value.__cause__ is None


class TestConcurrentWriters:
    def test_writer_between_read_and_write_is_kept(self, old: KeyRing) -> None:
        """A writer that stores new tokens between rekey's read and write loses nothing."""
        new = old.rotated("new")
        store = InterleavingStore()
        store.put(make_record("user", old, access="a1", refresh="r1"))

        def refresh(key: str) -> None:
            # A worker still on the old ring stores freshly refreshed tokens.
            current = store.get(key)
            assert current is not None
            rotated = make_record(key, old, access="a2", refresh="r2")
            store.put(rotated.replace(subscription_type="max", version=current.version))

        store.interleave(refresh)
        report = rekey(store, new)

        stored = store.get("user")
        assert stored is not None
        assert (1, RekeyReport(rekeyed=1, unchanged=0)) == (store.conflicts, report)
        assert (("a2", "r2"), "max") == (plaintexts(store, new, "user"), stored.subscription_type)
        assert ("new", "new") == key_ids(store, "user")

    def test_record_deleted_meanwhile_is_skipped(self, old: KeyRing, new: KeyRing) -> None:
        """A record deleted between rekey's read and write stays deleted and is not counted."""
        store = InterleavingStore()
        store.put(make_record("user", old, access="a", refresh="r"))
        store.interleave(store.delete)

        report = rekey(store, new)

        assert (RekeyReport(rekeyed=0, unchanged=0), None) == (report, store.get("user"))

    def test_endless_conflicts_raise(self, old: KeyRing, new: KeyRing) -> None:
        """A record that changes before every write makes rekey give up after 10 attempts."""
        store = InterleavingStore()
        store.put(make_record("user", old, access="a", refresh="r"))

        def bump(key: str) -> None:
            current = store.get(key)
            assert current is not None
            store.put(current.replace(failures=current.failures + 1))

        store.interleave(bump, times=100)

        with pytest.raises(ConflictError):
            rekey(store, new)

        stored = store.get("user")
        assert stored is not None
        assert (10, 10) == (store.conflicts, stored.failures)

    def test_writer_thread_storm_loses_no_update(self, old: KeyRing, new: KeyRing) -> None:
        """A thread incrementing counters by CAS throughout a rekey loses no increment."""
        store = MemoryStore()
        keys = [f"user-{number}" for number in range(100)]
        for key in keys:
            store.put(make_record(key, old, access=f"a-{key}", refresh=f"r-{key}"))
        increments: Counter[str] = Counter()
        started, stop = threading.Event(), threading.Event()

        def writer() -> None:
            # Runs from before rekey starts until after it ends, so the two overlap throughout.
            chooser = random.Random(7)
            while not stop.is_set():
                key = chooser.choice(keys)
                while True:
                    current = store.get(key)
                    assert current is not None
                    try:
                        store.put(current.replace(failures=current.failures + 1))
                    except ConflictError:
                        continue
                    break
                increments[key] += 1
                if increments.total() == 100:
                    started.set()

        thread = threading.Thread(target=writer)
        thread.start()
        started.wait(timeout=10)
        report = rekey(store, new)
        stop.set()
        thread.join(timeout=10)

        stored = {key: store.get(key) for key in keys}
        assert RekeyReport(rekeyed=100, unchanged=0) == report
        assert {key: increments[key] for key in keys} == {
            key: record.failures for key, record in stored.items() if record is not None
        }
        assert {key: (f"a-{key}", f"r-{key}") for key in keys} == {
            key: plaintexts(store, new, key) for key in keys
        }
