"""``migrate``: copy every credential, with its state, to another store by compare-and-swap.

Each key is copied on its own, judged against what the destination holds at that moment, so a
run cut off anywhere is finished by running it again: what was copied counts as unchanged, and
a key is never written twice (stores keep one record per key). The destination is never made
older: a credential it holds whose tokens are newer (obtained later, or without that to go by,
expiring later), or other tokens as new, is a login or a refresh it got by itself, and is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal

from ._exceptions import ConfigurationError, ConflictError, DecryptionError, StoreCorrupted
from ._keyring import KeyRing
from ._record import END_OF_TIME, TOKEN_FIELDS, Record
from ._rekey import MAX_ATTEMPTS, resealed
from ._store import CredentialStore, declares_plaintext, reported_damage

__all__ = ["MigrateReport", "migrate"]

#: ``progress(done, total)``: called with 0 before the first key, then after each key.
Progress = Callable[[int, int], None]

_Outcome = Literal["copied", "updated", "unchanged", "kept_newer"]

# What is compared as the credential's state: everything but the tokens (compared on their
# own, opened when re-sealing) and the lease, which belongs to the processes of its store.
_NOT_STATE = frozenset((*TOKEN_FIELDS, "lease_owner", "lease_until"))


@dataclass(frozen=True, slots=True)
class MigrateReport:
    """What :func:`migrate` did, counted key by key; never a token.

    ``copied``: created at the destination. ``updated``: overwritten there, the source holding
    a later credential, or the same one in another state (status, failures, cooldown).
    ``unchanged``: the destination already held the same credential in the same state.
    ``kept_newer``: the destination's own credential was kept, its tokens being newer, or other
    tokens as new. ``failed`` maps each key that was not copied to the reason: a
    damaged record on either side, or one that kept changing at the destination. Keys deleted
    from the source during the run count in none.
    """

    copied: int = 0
    updated: int = 0
    unchanged: int = 0
    kept_newer: int = 0
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every key was copied or deliberately left as the destination had it."""
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready values, for ``credkeeper migrate --json``."""
        return {
            "copied": self.copied,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "kept_newer": self.kept_newer,
            "failed": [{"key": key, "reason": reason} for key, reason in self.failed.items()],
        }


def migrate(
    source: CredentialStore,
    destination: CredentialStore,
    *,
    reseal: KeyRing | None = None,
    progress: Progress | None = None,
    concurrency: int = 8,
) -> MigrateReport:
    """Copy every credential in ``source`` to ``destination``, with its state, by compare-and-swap.

    For each key the destination's record is read and the copy decided against it:

    - absent: created;
    - the destination's credential is newer (a later ``refreshed_at`` when both records have
      one, else a later ``expires_at``; or other tokens as new): kept, since it is a login or
      a refresh the destination got by itself, and overwriting it could lose the only valid
      refresh token;
    - the same credential in the same state: left as it is;
    - otherwise (an older credential, or the same one in another state): overwritten, by
      compare-and-swap on the version just read; when another writer got there first, the
      record is read and judged again.

    Tokens, scopes, status, failures, last error and cooldown are copied; a lease is not (it
    belongs to the source's processes), and one the destination holds is kept. Tokens are
    copied as stored, unless ``reseal`` is given: every token is then re-sealed under its
    primary key, as :func:`rekey` does, so ``reseal`` must also hold the keys the source's
    tokens are sealed under (join the destination's ring and the source's). A re-sealed
    credential counts as unchanged when the destination holds the same tokens under that
    primary key.

    Running it again is always safe, and finishes a run that was cut off. Records the source
    cannot read, or that kept changing at the destination, are named in the report's
    ``failed`` and the others are copied. Raises :class:`ConfigurationError` when the stores
    disagree on sealing (one declared plaintext) in a way the copy would carry over, and
    :class:`DecryptionError`, naming the record, when ``reseal`` cannot open a token.
    ``progress(done, total)`` is called before the first key and after each one, in the
    calling thread. ``concurrency`` keys are copied at once, on as many threads (each key's
    reads and write stay in order): against a store across a network, each call waits a round
    trip. A store error other than a damaged record stops the run once the copies under way
    have finished; running it again goes on from there.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(
            f"concurrency must be a whole number of at least 1, got {concurrency!r}"
        )
    _check_sealing(source, destination, reseal)
    # All keys before any write, as rekey does: a scan cursor held across writes can block
    # writers, and a key listed twice would be counted twice.
    keys = sorted(set(source.scan_due(END_OF_TIME)))
    counts: dict[_Outcome, int] = {"copied": 0, "updated": 0, "unchanged": 0, "kept_newer": 0}
    failed: dict[str, str] = {}
    if progress is not None:
        progress(0, len(keys))
    copies = _each(keys, lambda key: _migrate_one(source, destination, key, reseal), concurrency)
    # Closed on the way out, so that a run stopped by an error has no copy left running.
    with contextlib.closing(copies):
        for done, (key, copy) in enumerate(copies, 1):
            try:
                outcome = copy.result()
            except StoreCorrupted as exc:
                # One damaged record must not keep the others from moving.
                failed[key] = str(exc)
            except ConflictError:
                failed[key] = (
                    f"the destination's record under key {key!r} changed under each of "
                    f"{MAX_ATTEMPTS} attempts; run the migration again"
                )
            else:
                if outcome is not None:
                    counts[outcome] += 1
            if progress is not None:
                progress(done, len(keys))
    # A store whose scan skips damaged records (the file store) names them on request.
    failed.update(reported_damage(source))
    return MigrateReport(**counts, failed=dict(sorted(failed.items())))


def _each(
    keys: list[str], work: Callable[[str], _Outcome | None], concurrency: int
) -> Generator[tuple[str, Future[_Outcome | None]], None, None]:
    """``work(key)`` for every key, ``concurrency`` at once: each key with its finished future,
    as they finish. Keys are handed to the threads as threads come free, not all at once, so a
    run over many keys holds few futures; when the caller stops early (an error, an
    interrupt), the copies under way finish and no other starts."""
    # Leaving the block, on an early stop too (the generator closed), waits for the copies
    # under way: no key is handed out beyond them.
    with ThreadPoolExecutor(concurrency, thread_name_prefix="credkeeper-migrate") as pool:
        pending = iter(keys)
        running: dict[Future[_Outcome | None], str] = {}
        while True:
            for key in pending:
                running[pool.submit(work, key)] = key
                if len(running) >= concurrency:
                    break
            if not running:
                return
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield running.pop(future), future


def _check_sealing(
    source: CredentialStore, destination: CredentialStore, reseal: KeyRing | None
) -> None:
    """Refuse a copy that would leave tokens in a form the destination's readers do not expect."""
    plain_source, plain_destination = declares_plaintext(source), declares_plaintext(destination)
    if reseal is not None and plain_destination:
        raise ConfigurationError(
            "the destination store is declared plaintext (its plaintext option) and keeps tokens "
            "as the application writes them, which would read re-sealed ones as ciphertexts; "
            "drop the key ring to re-seal with (--to-keys on the command line)"
        )
    if reseal is None and plain_source and not plain_destination:
        raise ConfigurationError(
            "the source store is declared plaintext (its plaintext option), and tokens copied "
            "as stored would reach the destination in clear; give a key ring to seal them with "
            "(--to-keys on the command line)"
        )
    if reseal is None and plain_destination and not plain_source:
        raise ConfigurationError(
            "the destination store is declared plaintext (its plaintext option), but the source's "
            "tokens are sealed: its application would read ciphertexts as tokens; migrate into a "
            "store that seals them, with the same key ring or codec"
        )


def _migrate_one(
    source: CredentialStore, destination: CredentialStore, key: str, reseal: KeyRing | None
) -> _Outcome | None:
    """What became of ``key`` at the destination; None when it left the source meanwhile."""
    record = source.get(key)
    if record is None:
        return None
    wanted = record.replace(lease_owner=None, lease_until=None, version=None)
    if reseal is not None:
        wanted = resealed(wanted, reseal)
    for _ in range(MAX_ATTEMPTS):
        present = destination.get(key)
        outcome = _judge(wanted, present, reseal)
        if outcome in ("unchanged", "kept_newer"):
            return outcome
        write = wanted
        if present is not None:
            # The destination's lease is its own processes': a refresh running there keeps it.
            write = wanted.replace(
                version=present.version,
                lease_owner=present.lease_owner,
                lease_until=present.lease_until,
            )
        try:
            destination.put(write)
        except ConflictError:
            continue
        return outcome
    raise ConflictError(f"the record under key {key!r} kept changing")


def _judge(wanted: Record, present: Record | None, reseal: KeyRing | None) -> _Outcome:
    """Whether to create, overwrite or keep the destination's record ``present``."""
    if present is None:
        return "copied"
    ours, theirs = _state(wanted), _state(present)
    same_tokens = _tokens(wanted, reseal) == _tokens(present, reseal)
    if _age(theirs, ours) > _age(ours, theirs) or (
        _age(theirs, ours) == _age(ours, theirs) and not same_tokens
    ):
        return "kept_newer"
    if same_tokens and ours == theirs and not _needs_reseal(present, reseal):
        return "unchanged"
    return "updated"


def _age(state: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[int, ...]:
    """How recent ``state``'s tokens are, to compare with ``other``'s: when they were obtained
    if both say, then when they expire. A salvaged answer expires at once though it is the
    newest; a row the application wrote itself (a mapped table) says nothing of when. Whole
    milliseconds, as every store keeps them, so that a store finer than another never makes
    its copy look older."""
    if state["refreshed_at"] is not None and other["refreshed_at"] is not None:
        return (state["refreshed_at"], state["expires_at"])
    return (state["expires_at"],)


def _state(record: Record) -> Mapping[str, Any]:
    return {name: value for name, value in record.to_document().items() if name not in _NOT_STATE}


def _tokens(record: Record, reseal: KeyRing | None) -> tuple[str | None, ...]:
    """The tokens to compare: as stored, or opened with ``reseal``."""
    if reseal is None:
        return tuple(getattr(record, field) for field in TOKEN_FIELDS)
    return tuple(_opened(reseal, record, field) for field in TOKEN_FIELDS)


def _opened(ring: KeyRing, record: Record, field: str) -> str | None:
    """A token's plain text; None when it does not open, so that it equals no token."""
    value: str = getattr(record, field)
    if not ring.is_sealed(value):
        return value
    try:
        return ring.unseal(value, key=record.key, field=field)
    except DecryptionError:
        return None


def _needs_reseal(record: Record, reseal: KeyRing | None) -> bool:
    return reseal is not None and any(reseal.needs_rekey(getattr(record, f)) for f in TOKEN_FIELDS)
