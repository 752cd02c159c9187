"""``rekey``: re-seal every stored token under the key ring's primary key, by compare-and-swap."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._exceptions import ConfigurationError, ConflictError, DecryptionError, StoreCorrupted
from ._keyring import KeyRing
from ._record import END_OF_TIME, TOKEN_FIELDS, Record
from ._store import CredentialStore, declares_plaintext, reported_damage

__all__ = ["RekeyReport", "rekey"]

# A record that changes under us this many times in a row is being written in a loop;
# give up on the run rather than spin. Migrations share it.
MAX_ATTEMPTS = 10


@dataclass(frozen=True, slots=True)
class RekeyReport:
    """What :func:`rekey` did: records re-sealed, and records already under the primary key.

    Records deleted while the run went on count in neither. ``damaged`` maps the key of each
    record the store could not read (left as it is) to the reason.
    """

    rekeyed: int
    unchanged: int
    damaged: dict[str, str] = dataclasses.field(default_factory=dict)


def rekey(store: CredentialStore, keyring: KeyRing) -> RekeyReport:
    """Re-seal the tokens of every record in ``store`` under ``keyring``'s primary key.

    Plain tokens get sealed, tokens under an older key get re-sealed, each record written by
    compare-and-swap: when another writer got there first, the record is read again and the
    other writer's change is kept. The plaintext never changes. Run it after every writer has
    the new ring, since a writer with the old ring keeps sealing under the old primary key.
    Raises :class:`DecryptionError` naming the record when a token does not open with
    ``keyring`` (add the key it was sealed under), and :class:`ConflictError` when a record
    kept changing through all the attempts.
    """
    if declares_plaintext(store):
        raise ConfigurationError(
            "the store is declared plaintext (its plaintext option): its tokens are kept as the "
            "application writes them, so there is nothing to re-seal"
        )
    # Take all keys before writing: a scan cursor left open across writes can block writers
    # (SQLite) or see an updated row twice (document stores), and a key seen twice would be
    # counted twice.
    keys = list(dict.fromkeys(store.scan_due(END_OF_TIME)))
    rekeyed = unchanged = 0
    damaged: dict[str, str] = {}
    for key in keys:
        try:
            outcome = _rekey_one(store, keyring, key)
        except StoreCorrupted as exc:
            # One damaged record must not stop the others from moving to the new key.
            damaged[key] = str(exc)
            continue
        if outcome is True:
            rekeyed += 1
        elif outcome is False:
            unchanged += 1
    # A store whose scan skips damaged records (the file store) names them on request.
    damaged.update(reported_damage(store))
    return RekeyReport(rekeyed=rekeyed, unchanged=unchanged, damaged=dict(sorted(damaged.items())))


def _rekey_one(store: CredentialStore, keyring: KeyRing, key: str) -> bool | None:
    """True when the record was re-sealed, False when it needed nothing, None when it is gone."""
    attempts = 0
    while True:
        record = store.get(key)
        if record is None:
            return None
        if not any(keyring.needs_rekey(getattr(record, field)) for field in TOKEN_FIELDS):
            return False
        try:
            store.put(resealed(record, keyring))
        except ConflictError:
            attempts += 1
            if attempts >= MAX_ATTEMPTS:
                raise
        else:
            return True


def resealed(record: Record, keyring: KeyRing) -> Record:
    changes: dict[str, str] = {}
    for field in TOKEN_FIELDS:
        try:
            changes[field] = keyring.reseal(getattr(record, field), key=record.key, field=field)
        except DecryptionError:
            raise DecryptionError(
                f"the {field} of the credential under key {record.key!r} could not be "
                "decrypted; add the key it was sealed under to the key ring, or check that "
                "the value was not altered or moved"
            ) from None
    return record.replace(**changes)
