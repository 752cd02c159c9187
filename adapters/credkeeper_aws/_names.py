"""Secret names: the store's prefix, and credkeeper keys written in Secrets Manager's alphabet.

Secrets Manager names hold at most 512 characters from ``A-Za-z0-9/_+=.@-``; credkeeper keys
are any printable text up to 255 characters. A key becomes ``prefix + encode_key(key)``:

- characters of the alphabet other than ``=`` stay as they are, so ``tenant/user-42`` stays
  readable in the console and in IAM policies;
- every other character, ``=`` included, becomes ``=XX`` for each byte of its UTF-8 form
  (uppercase hex): ``john smith`` is ``john=20smith``, ``é`` is ``=C3=A9``;
- a hyphen followed by exactly six characters at the end of the name is escaped too
  (``=2D``): AWS appends ``-`` and six random characters to make a secret's ARN, and warns
  that names ending that way are confused with partial ARNs;
- a key whose name would exceed 512 characters (long non-ASCII keys: an emoji takes 12) is
  named ``=H`` followed by the SHA-256 of its UTF-8 form, 64 hex digits. Its record
  carries the key, which the store checks on every read.

The readable form never produces ``=H`` (``H`` is not a hex digit), so the two forms cannot
meet, and since :func:`decode_name` inverts :func:`encode_key` the encoding is injective:
keys differing in case, normalisation, escaping or a last character get different names.
"""

from __future__ import annotations

import hashlib
import re
import string

from credkeeper import ConfigurationError
from credkeeper.storekit import check_key

__all__ = [
    "HASHED",
    "MAX_NAME_LENGTH",
    "MAX_PREFIX_LENGTH",
    "NAME_ALPHABET",
    "check_prefix",
    "decode_name",
    "encode_key",
    "is_hashed_name_of",
]

#: Every character Secrets Manager allows in a secret name.
NAME_ALPHABET = frozenset(string.ascii_letters + string.digits + "/_+=.@-")
#: The longest secret name Secrets Manager accepts.
MAX_NAME_LENGTH = 512

_HASH_MARK = "=H"
_HASHED_LENGTH = len(_HASH_MARK) + 64
#: A prefix leaves room for the longest name a key can get, the hashed one.
MAX_PREFIX_LENGTH = MAX_NAME_LENGTH - _HASHED_LENGTH

# The characters kept as they are; "=" is the escape character, so it is escaped itself.
_PLAIN = NAME_ALPHABET - {"="}
_ESCAPE = re.compile(r"=([0-9A-F]{2})")
_HASHED_FORM = re.compile(r"=H[0-9a-f]{64}")
_ARN_SUFFIX_LENGTH = 7  # "-" and six characters

#: What :func:`decode_name` returns for a hashed name: the key is in the record, not the name.
HASHED = object()


def check_prefix(prefix: object) -> str:
    """Return ``prefix`` if it can start every secret name of a store, else ConfigurationError."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(
            "the Secrets Manager store needs a name prefix, e.g. aws-sm://us-east-1/credkeeper/prod/"
        )
    bad = sorted(set(prefix) - NAME_ALPHABET)
    if bad:
        raise ConfigurationError(
            f"secret name prefix {prefix!r} has characters Secrets Manager does not allow in "
            f"names ({''.join(bad)!r}); use only letters, digits and /_+=.@-"
        )
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise ConfigurationError(
            f"secret name prefix is {len(prefix)} characters long; at most {MAX_PREFIX_LENGTH} "
            f"leave room for the key in Secrets Manager's {MAX_NAME_LENGTH}-character names"
        )
    if not prefix.endswith("/"):
        raise ConfigurationError(
            f"secret name prefix {prefix!r} must end with '/', e.g. {prefix}/, so that no "
            "other prefix (yours or another deployment's) starts with it"
        )
    return prefix


def _readable(key: str) -> str:
    parts = [
        char if char in _PLAIN else "".join(f"={byte:02X}" for byte in char.encode("utf-8"))
        for char in key
    ]
    name = "".join(parts)
    if len(name) >= _ARN_SUFFIX_LENGTH and name[-_ARN_SUFFIX_LENGTH] == "-":
        cut = len(name) - _ARN_SUFFIX_LENGTH
        name = f"{name[:cut]}=2D{name[cut + 1 :]}"
    return name


def _hashed(key: str) -> str:
    return _HASH_MARK + hashlib.sha256(key.encode("utf-8")).hexdigest()


def encode_key(key: str, *, prefix: str) -> str:
    """The part of ``key``'s secret name after ``prefix``: readable, or hashed when too long."""
    readable = _readable(key)
    if len(prefix) + len(readable) <= MAX_NAME_LENGTH:
        return readable
    return _hashed(key)


def is_hashed_name_of(encoded: str, key: str) -> bool:
    """Whether ``encoded`` is the hashed name of ``key``."""
    return encoded == _hashed(key)


def decode_name(encoded: str, *, prefix: str) -> str | object | None:
    """The key :func:`encode_key` turned into ``encoded``; :data:`HASHED`; or ``None``.

    ``None`` means no key is named so: the name was made by something else.
    """
    if _HASHED_FORM.fullmatch(encoded):
        return HASHED
    if not encoded or not set(encoded) <= NAME_ALPHABET:
        return None
    raw = bytearray()
    position = 0
    while position < len(encoded):
        char = encoded[position]
        if char == "=":
            escaped = _ESCAPE.match(encoded, position)
            if escaped is None:
                return None
            raw.append(int(escaped.group(1), 16))
            position = escaped.end()
        else:
            raw.extend(char.encode("ascii"))
            position += 1
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        check_key(key)
    except ConfigurationError:
        return None
    # Only the one name encode_key gives a key decodes to it: "=61" is not another name of "a".
    if encode_key(key, prefix=prefix) != encoded:
        return None
    return key
