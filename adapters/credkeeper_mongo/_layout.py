"""Documents, filters and updates of the MongoDB store, shared by the sync and the async client.

Every operation is a *plan*: a generator that yields :class:`Find`, :class:`Insert`,
:class:`Update` and :class:`Delete` operations and receives each one's result (the document
found, the matched or deleted count). ``MongoStore`` and ``AsyncMongoStore`` only execute what
a plan yields, so the filters, the update documents and the compare-and-swap decisions exist
once.

Two layouts share the plans' interface:

- :class:`OwnCollection`, credkeeper's own collection (``credkeeper_credentials`` by default):
  one document per key with ``_id`` = key, compare-and-swap by
  ``update_one({_id: key, version: v}, {$set: ...})`` and its ``matched_count``.
- :class:`Embedded`, credentials kept in a sub-document of documents the application already
  has (``users.claudeCredentials``), described by an :class:`EmbeddedLayout`. credkeeper's
  coordination state sits beside the credential in a ``credkeeper`` sub-document; the version
  a reader sees binds that state's version to a digest of the stored refresh token, and a write
  filters on both, so a write based on an old token loses even when the application replaced
  the credential behind credkeeper's back. The state's version also names the refresh token the
  state belongs to: once the application stores another one (the user logged in again), the
  state no longer applies.

Keys only ever appear as *values* in filters, never in field names or operator positions, so
a key such as ``$where.field`` or ``{"a": 1}`` is just a string.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from bson import Int64, ObjectId

from credkeeper import ConfigurationError, ConflictError, Record, Status, StoreCorrupted, StoreError
from credkeeper.storekit import (
    from_epoch_ms,
    new_version,
    read_epoch_ms,
    stored_record,
    to_epoch_ms,
    token_digest,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "Delete",
    "Embedded",
    "EmbeddedLayout",
    "Find",
    "Insert",
    "Layout",
    "ListIndexes",
    "Operation",
    "OwnCollection",
    "Plan",
    "Update",
]

DEFAULT_COLLECTION = "credkeeper_credentials"

Document: TypeAlias = dict[str, Any]


# -- operations --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Find:
    """``find_one(filter, projection)``; the plan receives the document or ``None``."""

    filter: Document
    projection: Document | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    """``insert_one(document)``; a duplicate ``key_field`` becomes ``ConflictError``."""

    document: Document
    key_field: str = "_id"


@dataclass(frozen=True, slots=True)
class Update:
    """``update_one(filter, update)``; the plan receives ``matched_count``."""

    filter: Document
    update: Document


@dataclass(frozen=True, slots=True)
class Delete:
    """``delete_one(filter)``; the plan receives ``deleted_count``."""

    filter: Document


@dataclass(frozen=True, slots=True)
class ListIndexes:
    """``list_indexes()``; the plan receives the index descriptions as a list of documents."""


Operation: TypeAlias = Find | Insert | Update | Delete | ListIndexes
Plan: TypeAlias = Generator[Operation, Any, Any]


def _conflict(key: str, what: str) -> ConflictError:
    return ConflictError(f"the record for key {key!r} {what}", key=key)


def _corrupted(key: str, what: str) -> StoreCorrupted:
    return StoreCorrupted(f"stored record for key {key!r} {what}", key=key)


def _nest(document: Document, path: str, value: Any) -> None:
    """Put ``value`` at a dotted ``path`` of ``document``, making the sub-documents on the way."""
    *parents, last = path.split(".")
    for step in parents:
        document = document.setdefault(step, {})
    document[last] = value


def _walk(document: Mapping[str, Any] | None, path: str) -> Any:
    """The value at a dotted ``path`` of ``document``, or ``None`` where a step is missing."""
    current: Any = document
    for step in path.split("."):
        if not isinstance(current, Mapping):
            return None
        current = current.get(step)
    return current


# -- credkeeper's own collection -----------------------------------------------------------


class OwnCollection:
    """credkeeper's own collection: one document per key, ``_id`` = key.

    The document is :meth:`Record.to_document` (times as Int64 epoch milliseconds, exact) plus
    ``version``, a random id replaced on every write, so a version read before a delete never
    matches the re-created record.
    """

    match_field = "_id"

    def indexes(self) -> list[list[tuple[str, int]]]:
        """The index ``scan_due`` reads: expiry first, with ``_id`` so the query is covered."""
        return [[("expires_at", 1), ("_id", 1)]]

    def due(self, before: datetime) -> tuple[Document, Document]:
        """The filter and projection of ``scan_due``."""
        return {"expires_at": {"$lte": Int64(to_epoch_ms(before))}}, {"_id": 1}

    def key_of(self, document: Mapping[str, Any]) -> str | None:
        """The key of a document ``scan_due`` found."""
        key = document.get("_id")
        return key if isinstance(key, str) else None

    def _document(self, record: Record, version: str) -> Document:
        document = record.to_document()
        for name in ("expires_at", "lease_until", "cooldown_until", "refreshed_at"):
            if document[name] is not None:
                document[name] = Int64(document[name])
        document["version"] = version
        return document

    def get(self, key: str) -> Plan:
        """Plan: the record under ``key``, or ``None``."""
        document = yield Find({"_id": key})
        if document is None:
            return None
        version = document.get("version")
        if not isinstance(version, str):
            raise _corrupted(key, "has no version; it was not written by credkeeper")
        return Record.from_document(key, document, version=version)

    def put(self, record: Record) -> Plan:
        """Plan: insert a new record, or compare-and-swap on its version; the record stored."""
        version = new_version()
        document = self._document(record, version)
        if record.version is None:
            # A duplicate _id fails the insert; the store turns that into ConflictError.
            yield Insert({"_id": record.key, **document})
        else:
            matched = yield Update(
                {"_id": record.key, "version": record.version}, {"$set": document}
            )
            if matched != 1:
                raise _conflict(record.key, "changed or was deleted since it was read")
        return record.replace(version=version)

    def delete(self, key: str) -> Plan:
        """Plan: remove the document; whether there was one."""
        deleted = yield Delete({"_id": key})
        return bool(deleted)


# -- credentials embedded in the application's documents -----------------------------------

_CAMEL = {
    "access_token": "accessToken",
    "refresh_token": "refreshToken",
    "expires_at": "expiresAt",
    "scopes": "scopes",
    "subscription_type": "subscriptionType",
    "version": "version",
    "status": "status",
    "lease_owner": "leaseOwner",
    "lease_until": "leaseUntil",
    "failures": "failures",
    "cooldown_until": "cooldownUntil",
    "last_error": "lastError",
    "refreshed_at": "refreshedAt",
}
_CREDENTIAL_FIELDS = ("access_token", "refresh_token", "expires_at", "scopes", "subscription_type")


def _check_path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"EmbeddedLayout.{name} must be a non-empty field path, got {value!r}"
        )
    for step in value.split("."):
        if not step or step.startswith("$") or "\x00" in step:
            raise ConfigurationError(
                f"EmbeddedLayout.{name} {value!r} is not a usable field path: each dotted part "
                "must be non-empty and must not start with '$'"
            )
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddedLayout:
    """Where credentials live inside documents the application already has.

    ``match_field`` names the field that identifies a document by credkeeper key (``_id``,
    ``userId``; it should have a unique index), and ``key_type`` how a key is matched against
    it: ``"str"`` as is, ``"objectid"`` as an ``ObjectId`` (24 hex digits), ``"int"`` as an
    integer (keys of digits). ``field_path`` is the sub-document holding the credential
    (``claudeCredentials``, or a dotted path), with fields named the way the wrapper's guide
    stores them (``field_naming="camel"``: ``accessToken``, ``refreshToken``, ``expiresAt``,
    ``scopes``, ``subscriptionType``) or ``"snake"`` (``access_token``, ...).

    Every field is written back in the format the document already has, so the application's
    other readers keep working: ``expiresAt`` as a BSON date, or as a number of the same BSON
    type (double, as JavaScript's ``Date.now() + ...`` is stored; int32; int64), and ``scopes``
    as an array or a space-separated string. Numbers count epoch milliseconds, or seconds with
    ``expires_at_unit="s"``. Where the document shows no format (a new credential, a missing or
    null field), ``expires_at_unit`` (``"ms"``, ``"s"``: an int64; ``"date"``: a BSON date) and
    ``scopes_format`` (``"array"`` or ``"space"``) decide.

    With ``upsert=True``, storing a credential for a key no document matches creates the
    document, holding only ``match_field`` and the credential; without it that is an error,
    because the application is expected to own its documents. When ``match_field`` is not
    ``_id`` it needs a unique index, or two concurrent creates could insert two documents.

    credkeeper's coordination state (version, lease, status, failures, when the tokens were last
    obtained) lives beside the credential in the sub-document ``state_field``
    (``claudeCredentials.credkeeper``), named in the same style. Nothing outside ``field_path``
    of an existing document is ever written.
    """

    match_field: str = "_id"
    field_path: str = "claudeCredentials"
    field_naming: Literal["camel", "snake"] = "camel"
    key_type: Literal["str", "objectid", "int"] = "str"
    expires_at_unit: Literal["ms", "s", "date"] = "ms"
    scopes_format: Literal["array", "space"] = "array"
    upsert: bool = False
    state_field: str = "credkeeper"

    def __post_init__(self) -> None:
        _check_path("match_field", self.match_field)
        _check_path("field_path", self.field_path)
        if self.field_naming not in ("camel", "snake"):
            raise ConfigurationError(
                f"EmbeddedLayout.field_naming must be 'camel' or 'snake', got {self.field_naming!r}"
            )
        if self.key_type not in ("str", "objectid", "int"):
            raise ConfigurationError(
                f"EmbeddedLayout.key_type must be 'str', 'objectid' or 'int', got {self.key_type!r}"
            )
        if self.expires_at_unit not in ("ms", "s", "date"):
            raise ConfigurationError(
                "EmbeddedLayout.expires_at_unit must be 'ms', 's' or 'date', "
                f"got {self.expires_at_unit!r}"
            )
        if self.scopes_format not in ("array", "space"):
            raise ConfigurationError(
                "EmbeddedLayout.scopes_format must be 'array' or 'space' (one string, "
                f"space-separated), got {self.scopes_format!r}"
            )
        if not isinstance(self.upsert, bool):
            raise ConfigurationError(
                f"EmbeddedLayout.upsert must be True or False, got {self.upsert!r}"
            )
        if (
            not isinstance(self.state_field, str)
            or not self.state_field
            or ("." in self.state_field or self.state_field.startswith("$"))
        ):
            raise ConfigurationError(
                f"EmbeddedLayout.state_field must be a plain field name, got {self.state_field!r}"
            )
        prefix = self.field_path + "."
        if self.match_field == self.field_path or self.match_field.startswith(prefix):
            raise ConfigurationError("EmbeddedLayout.match_field must lie outside field_path")
        if self.field_path.startswith(self.match_field + "."):
            raise ConfigurationError("EmbeddedLayout.field_path must lie outside match_field")
        if self.state_field in self.names().values():
            raise ConfigurationError(
                f"EmbeddedLayout.state_field {self.state_field!r} clashes with a credential field"
            )

    def names(self) -> dict[str, str]:
        """Record field to sub-document field name, for the credential's fields."""
        return {name: self.name(name) for name in _CREDENTIAL_FIELDS}

    def name(self, field_name: str) -> str:
        """The stored name of a credential or state field in this layout's naming."""
        return _CAMEL[field_name] if self.field_naming == "camel" else field_name


def _new_state_version(refresh_token: str) -> str:
    """A new state version naming the refresh token the state belongs to: random hex digits,
    ``:`` and the token's digest, the shape the SQL store's side rows have too."""
    return f"{new_version()[:15]}:{token_digest(refresh_token)}"


def _state_applies(version: str, refresh_token: str) -> bool:
    """Whether the state versioned ``version`` belongs to ``refresh_token``.

    Not when the application stored another refresh token (a re-login setting only
    ``refreshToken``) since credkeeper last wrote: a ``needs_reauth``, a lease or a cooldown of
    the old token must not hold the new one back. A version without a digest, written before
    versions named their token, always applies, so a lease taken before an upgrade is never
    dropped.
    """
    _, named, digest = version.partition(":")
    return not named or digest == token_digest(refresh_token)


_NO_STATE = "-"
_KEY_TYPES: dict[str, type] = {"str": str, "objectid": ObjectId, "int": int}
_KEY_SHAPES = {"objectid": "24 hex digits", "int": "digits"}
_INT32 = range(-(2**31), 2**31)
# Epoch seconds stay below it until the year 5138, epoch milliseconds passed it in March 1973:
# a positive expiry on the wrong side of it is in the other unit.
_SECONDS_LIMIT = 10**11


@dataclass(slots=True)
class Embedded:
    """Credentials in a sub-document of the application's documents, state beside them.

    credkeeper only ever ``$set``\\s and ``$unset``\\s fields under ``field_path`` of documents
    that exist, each in the format the document already has: it never replaces or deletes the
    application's documents, and inserts one only with ``upsert``. Creating a credential fills
    the sub-document where it holds no refresh token; deleting one unsets credkeeper's fields,
    and the sub-document itself when nothing else is left in it.

    The state (status, lease, failures, cooldown, last error, last refresh) belongs to the
    refresh token credkeeper last wrote: where the application has stored another one since, by
    a re-login that bypasses credkeeper, the credential reads as active, with no lease, failures,
    cooldown or known last refresh, and credkeeper's next write replaces that state.
    """

    layout: EmbeddedLayout
    _path: str = field(init=False)
    _fields: dict[str, str] = field(init=False)
    _unique_checked: bool = field(init=False)

    def __post_init__(self) -> None:
        self._path = self.layout.field_path
        self._fields = self.layout.names()
        # _id is always unique; another match field is checked once, before the first insert.
        self._unique_checked = not self.layout.upsert or self.layout.match_field == "_id"

    @property
    def match_field(self) -> str:
        """The field matched against keys."""
        return self.layout.match_field

    def _at(self, field_name: str) -> str:
        return f"{self._path}.{self._fields[field_name]}"

    def _state_at(self, field_name: str) -> str:
        return f"{self._path}.{self.layout.state_field}.{self.layout.name(field_name)}"

    def match(self, key: str) -> Document | None:
        """The filter matching the document for ``key``, or ``None`` if no document can.

        A key naming an id in another spelling than the id's own (``"0123"``, an ObjectId in
        uppercase) is a ConfigurationError: state is kept under the key, so a document must
        answer to exactly one.
        """
        value: Any = key
        if self.layout.key_type == "objectid":
            if not ObjectId.is_valid(key) or len(key) != 24:
                return None
            value = ObjectId(key)
        elif self.layout.key_type == "int":
            try:
                # int() also reads '+1', '0123', '1_000' and other scripts' digits.
                value = int(key)
            except ValueError:
                return None
        canonical = str(value)
        if canonical != key:
            raise ConfigurationError(
                f"key {key!r} is not how {self.layout.match_field} (key_type="
                f"{self.layout.key_type}) spells it: use {canonical!r}, its canonical form, so "
                "that a document answers to one key"
            )
        if self.layout.key_type == "int":
            if not key.isdigit() or len(key) > 18:
                return None
            value = Int64(value)
        return {self.layout.match_field: value}

    def indexes(self) -> list[list[tuple[str, int]]]:
        """An index on the expiry field, created only when the store is asked to."""
        return [[(self._at("expires_at"), 1)]]

    def _number(self, moment: datetime) -> int:
        """``moment`` as the number stored for it: epoch milliseconds, or seconds if so set."""
        milliseconds = to_epoch_ms(moment)
        return milliseconds // 1000 if self.layout.expires_at_unit == "s" else milliseconds

    def due(self, before: datetime) -> tuple[Document, Document]:
        """The filter and projection of ``scan_due``: due, and holding a credential."""
        projection: Document = {self.layout.match_field: 1}
        if self.layout.match_field != "_id":
            projection["_id"] = 0
        at = self._at("expires_at")
        condition = {
            # $lte compares within one BSON type only, and documents keep their own format:
            # one bound for numbers (of any width), one for dates, both served by the index.
            "$or": [
                {at: {"$lte": Int64(self._number(before))}},
                {at: {"$lte": before.astimezone(UTC)}},
            ],
            self._at("refresh_token"): {"$ne": None},
        }
        return condition, projection

    def key_of(self, document: Mapping[str, Any]) -> str | None:
        """The key of a document ``scan_due`` found, as text."""
        value = _walk(document, self.layout.match_field)
        kind = _KEY_TYPES[self.layout.key_type]
        # Only ids that get() can match again: with key_type="objectid", a string id is not one.
        if isinstance(value, bool) or not isinstance(value, kind):
            return None
        return str(value)

    # -- reading ---------------------------------------------------------------------------

    def _expiry(self, key: str, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            self._check_unit(key, value)
            scale = 1000 if self.layout.expires_at_unit == "s" else 1
            moment = read_epoch_ms(value * scale, key=key, field=self._fields["expires_at"])
            assert moment is not None
            return moment
        raise _corrupted(key, f"has no usable {self._at('expires_at')!r} field")

    def _check_unit(self, key: str, value: int) -> None:
        """Refuse an epoch number that reads as the other unit than ``expires_at_unit``'s.

        Seconds read as milliseconds put an expiry in 1970 (refreshed on every call), and
        milliseconds read as seconds thousands of years ahead (never refreshed): the layout is
        wrong, not the document. 0, which many programs write for "expired", is no value of
        either. An int32 field holds no epoch milliseconds past January 1970, so the same rule
        catches it: the value alone decides, whatever the number's BSON type.
        """
        at = self._at("expires_at")
        if self.layout.expires_at_unit != "s" and 0 < value < _SECONDS_LIMIT:
            raise ConfigurationError(
                f"the expiry of key {key!r} in field {at} is {value}, which is epoch seconds "
                "(as milliseconds it would fall in 1970-1973), but expires_at_unit="
                f"{self.layout.expires_at_unit} reads numbers as milliseconds: set "
                "expires_at_unit=s"
            )
        if self.layout.expires_at_unit == "s" and value >= _SECONDS_LIMIT:
            raise ConfigurationError(
                f"the expiry of key {key!r} in field {at} is {value}, which is epoch "
                "milliseconds (as seconds it would fall after the year 5000), but "
                "expires_at_unit=s reads it as seconds: set expires_at_unit=ms"
            )

    def _scopes(self, key: str, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return tuple(value.split())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise _corrupted(key, f"has a bad {self._at('scopes')!r} field")

    def _state(self, key: str, credential: Mapping[str, Any]) -> Mapping[str, Any]:
        state = credential.get(self.layout.state_field)
        if state is None:
            return {}
        if not isinstance(state, Mapping):
            raise _corrupted(key, f"has a bad {self.layout.state_field!r} sub-document")
        return state

    def _state_version(self, key: str, credential: Mapping[str, Any]) -> str | None:
        version = self._state(key, credential).get(self.layout.name("version"))
        if version is not None and not isinstance(version, str):
            raise _corrupted(key, "has a bad credkeeper version")
        return version

    def _record(self, key: str, credential: Any) -> Record | None:
        """The record in a credential sub-document; ``None`` when it holds no refresh token."""
        if not isinstance(credential, Mapping):
            return None
        names = self._fields
        refresh = credential.get(names["refresh_token"])
        if refresh is None:
            return None
        access = credential.get(names["access_token"])
        if not isinstance(access, str) or not isinstance(refresh, str):
            raise _corrupted(key, "has no usable tokens")
        subscription = credential.get(names["subscription_type"])
        if subscription is not None and not isinstance(subscription, str):
            raise _corrupted(key, f"has a bad {self._at('subscription_type')!r} field")
        version = self._state_version(key, credential)
        # The record's version still binds the state's, so a write replaces a void state.
        applies = version is None or _state_applies(version, refresh)
        state = self._state(key, credential)
        if not applies:
            # What the old login earned (needs_reauth, failures, a cooldown) is void; a lease is
            # not: it may be a live refresh (the stored value changes without a new token when
            # the application re-seals it with a random nonce), and it ends by itself.
            kept = {self.layout.name("lease_owner"), self.layout.name("lease_until")}
            state = {name: value for name, value in state.items() if name in kept}

        def stated(name: str) -> Any:
            return state.get(self.layout.name(name))

        try:
            status = Status(stated("status") or Status.ACTIVE.value)
        except ValueError:
            raise _corrupted(key, "has an unknown status") from None
        failures = stated("failures") or 0
        if isinstance(failures, bool) or not isinstance(failures, int):
            raise _corrupted(key, "has a bad failures count")
        for name in ("lease_owner", "last_error"):
            if stated(name) is not None and not isinstance(stated(name), str):
                raise _corrupted(key, f"has a bad {name!r} field")
        return stored_record(
            key=key,
            access_token=access,
            refresh_token=refresh,
            expires_at=self._expiry(key, credential.get(names["expires_at"])),
            scopes=self._scopes(key, credential.get(names["scopes"])),
            subscription_type=subscription,
            status=status,
            lease_owner=stated("lease_owner"),
            lease_until=read_epoch_ms(stated("lease_until"), key=key, field="lease_until"),
            failures=failures,
            cooldown_until=read_epoch_ms(stated("cooldown_until"), key=key, field="cooldown_until"),
            last_error=stated("last_error"),
            refreshed_at=read_epoch_ms(stated("refreshed_at"), key=key, field="refreshed_at"),
            version=f"{version or _NO_STATE}.{token_digest(refresh)}",
        )

    def get(self, key: str) -> Plan:
        """Plan: the record under ``key``, or ``None`` when the document holds no credential."""
        match = self.match(key)
        if match is None:
            return None
        document = yield Find(match, {self._path: 1})
        return self._record(key, _walk(document, self._path))

    # -- writing ---------------------------------------------------------------------------

    def _expiry_value(self, moment: datetime, stored: Any) -> Any:
        """``moment`` in the BSON type of the ``stored`` expiry, else as ``expires_at_unit`` says.

        Other programs read this field; a Node driver hands an int64 back as a different
        JavaScript value than a double, so even the number's width is kept.
        """
        date = from_epoch_ms(to_epoch_ms(moment))
        number = self._number(moment)
        if isinstance(stored, datetime):
            return date
        if isinstance(stored, float):
            return float(number)
        if isinstance(stored, int) and not isinstance(stored, bool | Int64):
            # An int32 stays one while the value fits; past that only an int64 is exact.
            return number if number in _INT32 else Int64(number)
        if isinstance(stored, Int64):
            return Int64(number)
        # Nothing stored, or nothing usable: the option decides.
        return date if self.layout.expires_at_unit == "date" else Int64(number)

    def _scopes_value(self, scopes: tuple[str, ...], stored: Any) -> Any:
        """``scopes`` as the stored field has them, else as ``scopes_format`` says."""
        if isinstance(stored, str) or (
            not isinstance(stored, list) and self.layout.scopes_format == "space"
        ):
            return " ".join(scopes)
        return list(scopes)

    def _values(self, record: Record, version: str, credential: Any) -> Document:
        """Every field credkeeper writes, relative to the credential sub-document, in the
        formats of the ``credential`` stored there (if any)."""
        stored: Mapping[str, Any] = credential if isinstance(credential, Mapping) else {}
        names = self._fields
        state_name = self.layout.name
        values: Document = {
            names["access_token"]: record.access_token,
            names["refresh_token"]: record.refresh_token,
            names["expires_at"]: self._expiry_value(
                record.expires_at, stored.get(names["expires_at"])
            ),
            names["scopes"]: self._scopes_value(record.scopes, stored.get(names["scopes"])),
        }
        # An application that never stored a subscription type gets no null one added.
        if record.subscription_type is not None or names["subscription_type"] in stored:
            values[names["subscription_type"]] = record.subscription_type
        values[self.layout.state_field] = {
            state_name("version"): version,
            state_name("status"): record.status.value,
            state_name("lease_owner"): record.lease_owner,
            state_name("lease_until"): (
                None if record.lease_until is None else Int64(to_epoch_ms(record.lease_until))
            ),
            state_name("failures"): record.failures,
            state_name("cooldown_until"): (
                None if record.cooldown_until is None else Int64(to_epoch_ms(record.cooldown_until))
            ),
            state_name("last_error"): record.last_error,
            state_name("refreshed_at"): (
                None if record.refreshed_at is None else Int64(to_epoch_ms(record.refreshed_at))
            ),
        }
        return values

    def _set_fields(self, values: Document) -> Document:
        # Field by field: anything else the application keeps in the sub-document survives.
        return {"$set": {f"{self._path}.{name}": value for name, value in values.items()}}

    def _check_unique(self, indexes: list[Mapping[str, Any]]) -> None:
        """Refuse to insert unless an index keeps ``match_field`` unique in every document."""
        wanted = self.layout.match_field
        for index in indexes:
            keys = list(index.get("key", {}).items())
            if (
                index.get("unique")
                and "partialFilterExpression" not in index
                and len(keys) == 1
                and keys[0][0] == wanted
                and keys[0][1] in (1, -1)
            ):
                return
        raise ConfigurationError(
            f"upsert=true with match_field={wanted} needs a unique index on {wanted}: without "
            "one, two workers creating the same key at once would insert two documents. "
            f"Create it, e.g. db.<collection>.createIndex({{{wanted}: 1}}, {{unique: true}})"
        )

    def _insert(self, record: Record, match: Document) -> Plan:
        """Plan: create the document for a key no document matches, if ``upsert`` allows."""
        if not self.layout.upsert:
            raise StoreError(
                f"no document in the collection has {self.layout.match_field} = {record.key!r}; "
                "credkeeper stores credentials in existing documents and never inserts them, "
                "unless the store is opened with upsert=true",
                key=record.key,
            )
        if record.version is not None:
            # Re-creating a document the application deleted would resurrect a credential.
            raise _conflict(record.key, "was deleted since it was read")
        if not self._unique_checked:
            self._check_unique((yield ListIndexes()))
            self._unique_checked = True
        version = _new_state_version(record.refresh_token)
        document: Document = {}
        _nest(document, self.layout.match_field, match[self.layout.match_field])
        _nest(document, self._path, self._values(record, version, None))
        # A duplicate of the (unique) match field, from another worker or the application
        # creating the document first, fails the insert; the store makes that ConflictError.
        yield Insert(document, key_field=self.layout.match_field)
        return record.replace(version=f"{version}.{token_digest(record.refresh_token)}")

    def put(self, record: Record) -> Plan:
        """Plan: compare-and-swap on the state's version and the stored refresh token; with
        ``upsert``, an insert where no document matches."""
        match = self.match(record.key)
        if match is None:
            shape = _KEY_SHAPES[self.layout.key_type]
            raise StoreError(
                f"key {record.key!r} cannot match {self.layout.match_field}: with "
                f"key_type={self.layout.key_type} keys are {shape}",
                key=record.key,
            )
        document = yield Find(match, {self._path: 1})
        if document is None:
            return (yield from self._insert(record, match))
        credential = _walk(document, self._path)
        current = self._record(record.key, credential)
        expected = None if current is None else current.version
        if record.version != expected:
            raise _conflict(record.key, "changed, was created or was deleted since it was read")
        version = _new_state_version(record.refresh_token)
        values = self._values(record, version, credential)
        if current is not None:
            assert isinstance(credential, Mapping)
            stored_version = self._state_version(record.key, credential)
            condition = {
                **match,
                self._at("refresh_token"): credential[self._fields["refresh_token"]],
                self._state_at("version"): (
                    {"$exists": False} if stored_version is None else stored_version
                ),
            }
            update = self._set_fields(values)
        elif isinstance(credential, Mapping):
            condition = {
                **match,
                self._path: {"$type": "object"},
                self._at("refresh_token"): None,
            }
            update = self._set_fields(values)
        elif credential is None:
            # Missing or null: the whole sub-document is new, since $set cannot create fields
            # inside a null.
            condition = {**match, self._path: None}
            update = {"$set": {self._path: values}}
        else:
            raise StoreCorrupted(
                f"field {self._path!r} of the document for key {record.key!r} holds a "
                f"{type(credential).__name__}, not a sub-document; credkeeper leaves it alone",
                key=record.key,
            )
        matched = yield Update(condition, update)
        if matched != 1:
            raise _conflict(record.key, "changed since it was read")
        return record.replace(version=f"{version}.{token_digest(record.refresh_token)}")

    def delete(self, key: str) -> Plan:
        """Plan: unset credkeeper's fields; whether there was a credential."""
        match = self.match(key)
        if match is None:
            return False
        fields = [*self._fields.values(), self.layout.state_field]
        matched = yield Update(
            {**match, self._at("refresh_token"): {"$ne": None}},
            {"$unset": {f"{self._path}.{name}": "" for name in fields}},
        )
        if not matched:
            return False
        # The sub-document goes too, but only if nothing of the application's is left in it.
        yield Update({**match, self._path: {}}, {"$unset": {self._path: ""}})
        return True


Layout: TypeAlias = OwnCollection | Embedded
