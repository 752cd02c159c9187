"""What one secret holds, and the expiry tag beside it; encoded and decoded without I/O.

Each version of a secret holds one JSON object::

    {"format": "credkeeper.aws-sm", "format_version": 1, "key": "<key>",
     "replaces": "<VersionId of the version this one replaced, or null>",
     "record": {...Record.to_document()...}}

``key`` lets a hashed name be checked against the key asked for, and lets ``scan_due`` learn
the key of a hashed name. ``replaces`` links each version to its predecessor: the chain a
writer follows back from ``AWSCURRENT`` to learn whether its own write landed when the
answer to it was lost (see ``_store``).

The tag ``credkeeper:expires-at`` holds ``<expires_at in epoch ms>/<VersionId>``: the expiry
of that one version, so ``scan_due`` can tell a tag that is still exact (its version is
``AWSCURRENT``) from one a later write has not caught up with yet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from credkeeper import Record, StoreCorrupted
from credkeeper.storekit import to_epoch_ms

__all__ = [
    "EXPIRY_TAG",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_SECRET_BYTES",
    "Stored",
    "decode",
    "encode",
    "expiry_tag",
    "parse_expiry_tag",
]

FORMAT = "credkeeper.aws-sm"
FORMAT_VERSION = 1
EXPIRY_TAG = "credkeeper:expires-at"
#: The largest SecretString Secrets Manager accepts, in UTF-8 bytes.
MAX_SECRET_BYTES = 65536

_TAG_VALUE = re.compile(r"(-?[0-9]{1,19})/([A-Za-z0-9-]{1,64})")


@dataclass(frozen=True, slots=True)
class Stored:
    """One decoded version: the record (its ``version`` set) and the version it replaced."""

    record: Record
    replaces: str | None


def encode(record: Record, *, replaces: str | None) -> str:
    """The SecretString for ``record``, replacing version ``replaces`` (``None``: a create)."""
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": record.key,
        "replaces": replaces,
        "record": record.to_document(),
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def decode(secret: str | None, *, key: str | None, name: str, version: str) -> Stored:
    """Parse one version of secret ``name``; anything credkeeper did not write is StoreCorrupted.

    ``key`` is the key the caller asked for (``None`` when it is not known yet, for a hashed
    name in a scan); a record of another key is refused too.
    """

    def corrupted(reason: str) -> StoreCorrupted:
        return StoreCorrupted(
            f"secret {name!r} does not hold a credkeeper record ({reason}); it was left "
            "untouched: move it out of the store's prefix or use another prefix",
            key=key,
        )

    if secret is None:
        raise corrupted("it has a binary value, not a JSON string")
    try:
        data: Any = json.loads(secret)
    except (ValueError, RecursionError):
        raise corrupted("its value is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise corrupted(f"no 'format': {FORMAT!r} marker; something else wrote this JSON")
    if data.get("format_version") != FORMAT_VERSION:
        raise corrupted(
            f"format_version is {data.get('format_version')!r}, this credkeeper reads "
            f"{FORMAT_VERSION}; a newer credkeeper may have written it"
        )
    stored_key, replaces, document = data.get("key"), data.get("replaces"), data.get("record")
    if not isinstance(stored_key, str) or (key is not None and stored_key != key):
        raise corrupted(f"it belongs to key {stored_key!r}, not {key!r}")
    if replaces is not None and not isinstance(replaces, str):
        raise corrupted("'replaces' is not a version id")
    if not isinstance(document, dict):
        raise corrupted("'record' is not a JSON object")
    record = Record.from_document(stored_key, document, version=version)
    return Stored(record, replaces)


def expiry_tag(record: Record, version: str) -> dict[str, str]:
    """The tag saying that ``version`` of a secret holds ``record``'s expiry."""
    return {"Key": EXPIRY_TAG, "Value": f"{to_epoch_ms(record.expires_at)}/{version}"}


def parse_expiry_tag(tags: object) -> tuple[int, str] | None:
    """``(expires_at in epoch ms, VersionId)`` from a ``Tags`` list, or ``None`` if absent."""
    if not isinstance(tags, list):
        return None
    for tag in tags:
        if isinstance(tag, dict) and tag.get("Key") == EXPIRY_TAG:
            matched = _TAG_VALUE.fullmatch(str(tag.get("Value", "")))
            if matched is None:
                return None
            return int(matched.group(1)), matched.group(2)
    return None
