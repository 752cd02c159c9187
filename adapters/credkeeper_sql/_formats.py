"""The formats of an application's credential columns, read and written back as they were; no I/O.

Other programs read the same rows credkeeper refreshes (the wrapper guide's JavaScript and PHP
clients among them), so every mapped column is written in the format it already has:

- the expiry as a timestamp, an integer of epoch milliseconds or seconds, or ISO-8601 text,
  spelled the way the row spells it (``T`` or space, fractional digits, zone suffix);
- the scopes as space-separated text, a JSON array (in a JSON column or in text), or a
  PostgreSQL ``text[]``.

The column's reflected type decides where it is unambiguous; within a text column the stored
value decides, and where the row shows nothing the options (``expires_at_unit``,
``scopes_format``) or the column type's usual writer do.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

__all__ = [
    "JAVASCRIPT_ISO",
    "SQLITE_DATETIME",
    "WIDEST_OFFSET",
    "ExpiryKind",
    "IsoStyle",
    "ScopesFormat",
    "ScopesKind",
    "json_array_scopes",
    "json_scopes",
    "parse_iso",
    "read_scopes",
    "text_scopes_format",
]

#: How an expiry column holds instants: a timestamp type, an integer of epoch ms or s, text.
ExpiryKind = Literal["timestamp", "integer", "text"]
#: How a scopes column holds them: text (space-separated or a JSON array), JSON, text[].
ScopesKind = Literal["text", "json", "array"]
#: The ``scopes_format`` option's values.
ScopesFormat = Literal["space", "json", "array"]

#: The widest UTC offset in use (Kiribati's +14:00; the westmost is -12:00). ISO text with a
#: wider one is not read as an instant, so every expiry read lies within it of its wall time.
WIDEST_OFFSET = timedelta(hours=14)

# Date, separator, time, optional fraction, optional zone: the ISO-8601 forms programs write.
_ISO = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})(?P<sep>[T ])(?P<time>\d{2}:\d{2}:\d{2})"
    r"(?:\.(?P<fraction>\d{1,9}))?(?P<zone>Z|[+-]\d{2}(?::?\d{2})?)?"
)


@dataclass(frozen=True, slots=True)
class IsoStyle:
    """How one program spells an instant as ISO-8601 text.

    ``separator`` between date and time (``"T"`` or ``" "``), ``digits`` of fractional
    seconds (0 for none), and ``zone``, the suffix exactly as written (``"Z"``, ``"+00:00"``,
    ``"+0200"``; ``""`` for a naive time, which credkeeper reads and writes as UTC).
    """

    separator: str
    digits: int
    zone: str

    def render(self, moment: datetime) -> str:
        """``moment`` in this style, in the zone the style's suffix names."""
        zone = _zone(self.zone)
        assert zone is not None, "a style's zone is one parse_iso accepted"
        local = moment.astimezone(zone)
        text = local.strftime(f"%Y-%m-%d{self.separator}%H:%M:%S")
        if self.digits:
            # Digits past microseconds (Java's nanoseconds) are zeros: there is nothing finer.
            text += "." + f"{local.microsecond:06d}".ljust(self.digits, "0")[: self.digits]
        return text + self.zone


#: ``Date.prototype.toISOString()``: the wrapper guide's JavaScript, and credkeeper's default
#: for a text expiry column whose row shows no style.
JAVASCRIPT_ISO = IsoStyle("T", 3, "Z")
#: What SQLAlchemy and Python's ``str(datetime)`` write into a SQLite DATETIME column, which
#: SQLite keeps as text.
SQLITE_DATETIME = IsoStyle(" ", 6, "")


def _zone(suffix: str) -> timezone | None:
    """The zone a suffix names; ``None`` for an offset no zone has (``+23:00``, ``+05:75``)."""
    if suffix in ("", "Z"):
        return UTC
    sign = -1 if suffix[0] == "-" else 1
    digits = suffix[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:] or 0)
    offset = timedelta(hours=hours, minutes=minutes)
    if minutes > 59 or offset > WIDEST_OFFSET:
        return None
    return timezone(sign * offset)


def parse_iso(text: str) -> tuple[datetime, IsoStyle] | None:
    """The aware instant ``text`` spells and the style it is spelled in; ``None`` if it is not
    ISO-8601 text, or its offset is wider than :data:`WIDEST_OFFSET`. A time without a zone is
    UTC."""
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    zone = _zone(match["zone"] or "")
    if zone is None:
        return None
    fraction = match["fraction"] or ""
    try:
        moment = datetime.fromisoformat(
            f"{match['date']}T{match['time']}"
            + (f".{fraction[:6].ljust(6, '0')}" if fraction else "")
        )
    except ValueError:  # 2026-02-30 and the like
        return None
    try:
        instant = moment.replace(tzinfo=zone).astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 and the like: before year 1 in UTC
        return None
    return instant, IsoStyle(match["sep"], len(fraction), match["zone"] or "")


def read_scopes(value: Any) -> tuple[str, ...] | None:
    """The scopes a column value holds, whatever its format; ``None`` if it holds none usable.

    ``NULL`` and empty text are no scopes; text starting with ``[`` is a JSON array of strings,
    other text is space-separated; a list is a PostgreSQL array.
    """
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(value) if all(isinstance(item, str) for item in value) else None
    if not isinstance(value, str):
        return None
    if not value.lstrip().startswith("["):
        return tuple(value.split())
    return json_array_scopes(value)


@functools.lru_cache(maxsize=256)
def json_array_scopes(text: str) -> tuple[str, ...] | None:
    """The scopes a JSON array of strings holds, or ``None``. Kept for the few sets of scopes
    credentials share: parsing them again on every read costs more than the cache."""
    try:
        scopes = json.loads(text)
    except ValueError:
        return None
    if not isinstance(scopes, list) or not all(isinstance(item, str) for item in scopes):
        return None
    return tuple(scopes)


def text_scopes_format(stored: Any) -> Literal["space", "json"] | None:
    """The format of scopes stored as text, or ``None`` when the value shows none."""
    if not isinstance(stored, str) or not stored.strip():
        return None
    return "json" if stored.lstrip().startswith("[") else "space"


def json_scopes(scopes: tuple[str, ...], stored: Any) -> str:
    """``scopes`` as a JSON array, spaced as the ``stored`` array was.

    ``JSON.stringify`` and PHP's ``json_encode`` write ``["a","b"]``; Python's ``json.dumps``
    writes ``["a", "b"]`` (and escapes non-ASCII). The stored text tells which program wrote
    it; without a telling value (none, or a single scope) the compact form is written.
    """
    if isinstance(stored, str) and '", "' in stored:
        return json.dumps(list(scopes))
    return json.dumps(list(scopes), separators=(",", ":"), ensure_ascii=False)
