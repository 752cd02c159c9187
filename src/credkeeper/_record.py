"""``Record``: what a store keeps for one key. Stores know records, never OAuth."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ._credentials import from_epoch_ms, to_epoch_ms
from ._exceptions import ConfigurationError, InvalidKey, StoreCorrupted

__all__ = [
    "MAX_KEY_LENGTH",
    "Record",
    "Status",
    "check_key",
    "check_moment",
    "read_epoch_ms",
    "stored_record",
]

MAX_KEY_LENGTH = 255
# The token fields, sealed under these names when a key ring is set.
TOKEN_FIELDS = ("access_token", "refresh_token")
# Every record expires before this, so ``scan_due(END_OF_TIME)`` lists every key. Whole
# seconds: a backend that keeps milliseconds would round datetime.max's .999999 up into the
# year 10000.
END_OF_TIME = datetime.max.replace(microsecond=0, tzinfo=UTC)


class Status(enum.StrEnum):
    """Whether a credential can be refreshed, or waits for the user to log in again."""

    ACTIVE = "active"
    NEEDS_REAUTH = "needs_reauth"


def check_moment(name: str, value: object) -> datetime:
    """Return ``value`` if it is an aware datetime, else raise ConfigurationError naming ``name``.

    A naive datetime has no place on a timeline shared by hosts in different zones: refusing it
    everywhere keeps every store from reading it in its own way.
    """
    if not isinstance(value, datetime):
        raise ConfigurationError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigurationError(
            f"{name} is a naive datetime; pass an aware one, e.g. datetime.now(timezone.utc)"
        )
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ConfigurationError(
            f"{name} falls outside the years 1 to 9999 in UTC, which no store can keep"
        ) from None
    return value


def check_key(key: object) -> str:
    """Return ``key`` if it can name a credential in every store, else raise InvalidKey."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a str, not {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key must be 1 to {MAX_KEY_LENGTH} characters long")
    if not key.isprintable() or key != key.strip():
        raise InvalidKey("key must be printable, without control characters or surrounding spaces")
    return key


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One stored credential with its coordination state.

    ``access_token`` and ``refresh_token`` are opaque strings to a store: sealed ciphertexts
    when the manager has a key ring. ``refreshed_at`` is when the tokens were obtained (the
    provider's refresh, or the login stored with ``put``); ``None`` where it is not known, as on
    records stored before credkeeper kept it. ``version`` is the store's compare-and-swap token:
    ``None`` on a record that was never stored; stores set it on every successful ``put``.
    """

    key: str
    access_token: str
    refresh_token: str
    expires_at: datetime
    scopes: tuple[str, ...] = ()
    subscription_type: str | None = None
    status: Status = Status.ACTIVE
    lease_owner: str | None = None
    lease_until: datetime | None = None
    failures: int = 0
    cooldown_until: datetime | None = None
    last_error: str | None = None
    refreshed_at: datetime | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        # Every store receives records made here, so checking once here makes every store
        # refuse the same misuse alike; messages name fields, never a token's value.
        check_key(self.key)
        # Exact types first: what the engine makes and stores read back (str, tuple, int,
        # Status, UTC datetimes) passes on identity tests alone, at a third of the cost of
        # the full checks; anything else (subclasses, other zones, mistakes) takes those.
        if not (
            type(self.access_token) is str
            and type(self.refresh_token) is str
            and type(self.expires_at) is datetime
            and self.expires_at.tzinfo is UTC
            and (
                self.lease_until is None
                or (type(self.lease_until) is datetime and self.lease_until.tzinfo is UTC)
            )
            and (
                self.cooldown_until is None
                or (type(self.cooldown_until) is datetime and self.cooldown_until.tzinfo is UTC)
            )
            and (
                self.refreshed_at is None
                or (type(self.refreshed_at) is datetime and self.refreshed_at.tzinfo is UTC)
            )
            and type(self.scopes) is tuple
            and all(type(scope) is str for scope in self.scopes)
            and type(self.status) is Status
            and type(self.failures) is int
            and self.failures >= 0
            and (self.subscription_type is None or type(self.subscription_type) is str)
            and (self.lease_owner is None or type(self.lease_owner) is str)
            and (self.last_error is None or type(self.last_error) is str)
            and (self.version is None or type(self.version) is str)
        ):
            self._check_fields()

    def _check_fields(self) -> None:
        """The full checks of every field but the key, raising ConfigurationError naming it."""
        for name in ("access_token", "refresh_token"):
            if not isinstance(getattr(self, name), str):
                raise ConfigurationError(
                    f"Record.{name} must be a str, not {type(getattr(self, name)).__name__}"
                )
        check_moment("Record.expires_at", self.expires_at)
        for name in ("lease_until", "cooldown_until", "refreshed_at"):
            if getattr(self, name) is not None:
                check_moment(f"Record.{name}", getattr(self, name))
        if not isinstance(self.scopes, tuple) or not all(isinstance(s, str) for s in self.scopes):
            raise ConfigurationError("Record.scopes must be a tuple of str")
        if not isinstance(self.status, Status):
            raise ConfigurationError(
                f"Record.status must be a credkeeper.Status, not {type(self.status).__name__}"
            )
        if (
            isinstance(self.failures, bool)
            or not isinstance(self.failures, int)
            or self.failures < 0
        ):
            raise ConfigurationError(f"Record.failures must be an int >= 0, got {self.failures!r}")
        for name in ("subscription_type", "lease_owner", "last_error", "version"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    f"Record.{name} must be a str or None, not {type(value).__name__}"
                )

    def __repr__(self) -> str:
        return (
            f"Record(key={self.key!r}, expires_at={self.expires_at.isoformat()!r}, "
            f"status={self.status.value!r}, lease_owner={self.lease_owner!r}, "
            f"failures={self.failures}, version={self.version!r})"
        )

    def replace(self, **changes: Any) -> Record:
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_document(self) -> dict[str, Any]:
        """A JSON-ready mapping of every field but ``key`` and ``version``; times in epoch ms.

        Document stores (file, MongoDB, Secrets Manager) keep this shape.
        """
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": to_epoch_ms(self.expires_at),
            "scopes": list(self.scopes),
            "subscription_type": self.subscription_type,
            "status": self.status.value,
            "lease_owner": self.lease_owner,
            "lease_until": None if self.lease_until is None else to_epoch_ms(self.lease_until),
            "failures": self.failures,
            "cooldown_until": (
                None if self.cooldown_until is None else to_epoch_ms(self.cooldown_until)
            ),
            "last_error": self.last_error,
            "refreshed_at": (None if self.refreshed_at is None else to_epoch_ms(self.refreshed_at)),
        }

    @classmethod
    def from_document(cls, key: str, document: Mapping[str, Any], *, version: str) -> Record:
        """The inverse of :meth:`to_document`; a field of the wrong type raises StoreCorrupted."""

        def field(name: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
            value = document.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise StoreCorrupted(
                    f"stored record for key {key!r} has a bad {name!r} field; "
                    "it was not written by credkeeper",
                    key=key,
                )
            return value

        def moment(name: str, *, optional: bool = False) -> datetime | None:
            return read_epoch_ms(field(name, int, optional=optional), key=key, field=name)

        scopes = field("scopes", list)
        if not all(isinstance(item, str) for item in scopes):
            raise StoreCorrupted(f"stored record for key {key!r} has a bad 'scopes' field", key=key)
        try:
            status = Status(field("status", str))
        except ValueError:
            raise StoreCorrupted(
                f"stored record for key {key!r} has an unknown status", key=key
            ) from None
        if field("failures", int) < 0:
            raise StoreCorrupted(
                f"stored record for key {key!r} has a bad 'failures' field", key=key
            )
        expires_at = moment("expires_at")
        fields: dict[str, Any] = {
            "key": key,
            "access_token": field("access_token", str),
            "refresh_token": field("refresh_token", str),
            "expires_at": expires_at,
            "scopes": tuple(scopes),
            "subscription_type": field("subscription_type", str, optional=True),
            "status": status,
            "lease_owner": field("lease_owner", str, optional=True),
            "lease_until": moment("lease_until", optional=True),
            "failures": field("failures", int),
            "cooldown_until": moment("cooldown_until", optional=True),
            "last_error": field("last_error", str, optional=True),
            "refreshed_at": moment("refreshed_at", optional=True),
            "version": version,
        }
        return stored_record(**fields)


def read_epoch_ms(value: object, *, key: str, field: str) -> datetime | None:
    """A stored time in epoch milliseconds as an aware UTC datetime; ``None`` stays ``None``.

    A value that is not an integer, or one beyond the datetime range, raises
    :class:`~credkeeper.StoreCorrupted` naming ``key`` and ``field`` (never the value).
    """
    if value is None:
        return None
    # An exact int, what every driver hands back, needs no further look.
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise StoreCorrupted(f"stored record for key {key!r} has a bad {field!r} field", key=key)
    try:
        return from_epoch_ms(value)
    except (OverflowError, ValueError, OSError):
        raise StoreCorrupted(
            f"stored record for key {key!r} has an out-of-range {field!r} field", key=key
        ) from None


def stored_record(**fields: Any) -> Record:
    """A :class:`Record` of ``fields`` a store read back.

    What a Record refuses there (a negative failure count, a naive time) is damage in the
    store, not a caller's mistake: :class:`StoreCorrupted` naming the key, never a value.
    """
    try:
        return Record(**fields)
    except ConfigurationError as exc:
        key = fields.get("key")
        raise StoreCorrupted(
            f"stored record for key {key!r} is not a valid record: {exc}",
            key=key if isinstance(key, str) else None,
        ) from None
