"""``KeyRing``: named AES-256-GCM keys that seal token fields at rest.

The first key is primary: every value is sealed under it. The others only open values sealed
before a rotation, until ``rekey`` has moved everything to the primary key. A sealed value reads
``ck1:<key id>:<base64url(nonce || ciphertext || tag)>``; its associated data binds it to one store
key and one field, so a ciphertext copied to another user or another field does not open.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import shlex
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._exceptions import ConfigurationError, CredentialsError, DecryptionError

__all__ = ["KeyRing"]

_PREFIX = "ck1:"
_AD_PREFIX = b"credkeeper/v1\x00"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_MAX_ID_LENGTH = 32
_KEY_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{_MAX_ID_LENGTH}}}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_SEPARATORS = re.compile(r"[\s,]+")
_ID_RULE = "key ids are 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-'"
_DECRYPTION_FAILED = (
    "a sealed value could not be decrypted; wrong key ring, or the value was altered or moved"
)


class KeyRing:
    """Named 256-bit AES-GCM keys; the first one seals, any of them opens.

    Like ``cryptography``'s ``MultiFernet``: build it once from configuration
    (:meth:`from_env`, :meth:`from_file`) or from ``(key id, 32 bytes)`` pairs, primary first,
    then :meth:`seal` and :meth:`unseal` token fields.
    Keys are validated here, so a bad configuration fails at start-up, not on the first refresh.
    A ring never shows its key material: ``repr`` lists the ids, pickling is refused, and only
    :meth:`export` writes the keys out.
    """

    __slots__ = ("_aeads", "_keys")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._setup(_validate(keys, source="the key ring"))

    def _setup(self, keys: dict[str, bytes]) -> None:
        self._keys = keys
        self._aeads = {key_id: AESGCM(key) for key_id, key in keys.items()}

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def generate(cls, key_id: str | None = None) -> KeyRing:
        """A ring of one new random key, named ``key_id`` or ``k`` + 8 random hex digits."""
        if key_id is None:
            key_id = _new_key_id()
        return cls([(key_id, secrets.token_bytes(_KEY_BYTES))])

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """A ring from ``id:base64url-key`` entries, the format :meth:`export` writes.

        Entries are separated by commas, whitespace or newlines, primary first; ``=`` padding
        is optional, and ``#`` starts a comment to the end of its line, so a key file can
        explain itself.
        """
        return cls._parse(text, source="the key text")

    @classmethod
    def from_env(cls, name: str = "CREDKEEPER_KEYS") -> KeyRing:
        """A ring from the environment variable ``name``, read as the command line reads it.

        The value is key text in the :meth:`parse` format, or ``@PATH`` of a key file read by
        :meth:`from_file` (so is one line without ``:`` containing ``/`` or starting with ``~``
        or ``.``, since key text always has ``id:key`` entries).
        """
        text = os.environ.get(name, "")
        if not text.strip():
            raise ConfigurationError(
                f"environment variable {name} is not set or empty; run `credkeeper keygen` "
                f"and set {name} to its output, or to @PATH of the key file it wrote"
            )
        path = key_file(text.strip())
        if path is not None:
            return cls.from_file(path)
        return cls._parse(text, source=f"environment variable {name}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        """A ring from a key file in the :meth:`parse` format.

        On POSIX the file must be readable and writable by its owner only (``chmod 600``):
        a key file others can read is a leaked key, and one others can write lets them plant theirs.
        """
        filename = os.fspath(path)
        try:
            with open(filename, "rb") as handle:
                # fstat on the open file: checking the path first would race with a swap.
                mode = os.fstat(handle.fileno()).st_mode
                data = handle.read()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read key file {filename!r}: {exc.strerror or exc}"
            ) from exc
        # Windows keeps access rights in ACLs that these mode bits do not describe.
        group_or_other = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH
        if os.name == "posix" and mode & group_or_other:
            raise ConfigurationError(
                f"key file {filename!r} is readable or writable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {shlex.quote(filename)}`"
            )
        try:
            # utf-8-sig: editors on Windows like to start files with a byte-order mark.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            # from None: the exception object holds the file's bytes, keys included.
            raise ConfigurationError(f"key file {filename!r} is not UTF-8 text") from None
        return cls._parse(text, source=f"key file {filename!r}")

    @classmethod
    def _parse(cls, text: str, *, source: str) -> KeyRing:
        # Neither ids nor base64url use "#", so it can start a comment anywhere on a line.
        uncommented = "\n".join(line.partition("#")[0] for line in text.splitlines())
        entries = [entry for entry in _SEPARATORS.split(uncommented) if entry]
        keys: list[tuple[str, bytes]] = []
        for position, entry in enumerate(entries, start=1):
            key_id, colon, encoded = entry.partition(":")
            if not colon:
                # Never echo the entry: without an id it is most likely a bare key.
                raise ConfigurationError(
                    f"entry {position} in {source} has no key id; write entries as "
                    "id:base64url-key, e.g. the output of `credkeeper keygen`"
                )
            _check_key_id(key_id, position, source=source)
            key = _b64decode(encoded.rstrip("="))
            if key is None:
                raise ConfigurationError(
                    f"key {key_id!r} in {source} is not valid base64url; "
                    "generate keys with `credkeeper keygen`"
                )
            keys.append((key_id, key))
        ring = cls.__new__(cls)
        ring._setup(_validate(keys, source=source))
        return ring

    # -- inspection --------------------------------------------------------------------------

    @property
    def primary_id(self) -> str:
        """The id of the key that seals new values."""
        return next(iter(self._keys))

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id, primary first."""
        return tuple(self._keys)

    def __repr__(self) -> str:
        return f"KeyRing(primary_id={self.primary_id!r}, key_ids={self.key_ids!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a KeyRing cannot be pickled, so that keys never travel unnoticed; "
            "pass export() explicitly or load the ring in the other process"
        )

    # The ring is immutable; copies can share it, and copy would otherwise hit __reduce__.
    def __copy__(self) -> KeyRing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> KeyRing:
        return self

    def export(self) -> str:
        """The ring in the :meth:`parse` format, primary first, one key per line.

        This is the key material itself: write it only to a ``chmod 600`` file or a secret store.
        """
        return "\n".join(f"{key_id}:{_b64encode(key)}" for key_id, key in self._keys.items())

    def rotated(self, key_id: str | None = None) -> KeyRing:
        """A new ring whose primary is a new random key; the current keys stay, for reading.

        Run ``rekey`` once every writer uses the new ring, then drop the old keys.
        """
        if key_id is None:
            # A clash among 2**32 random ids is unlikely, but would fail as a duplicate id.
            key_id = _new_key_id()
            while key_id in self._keys:
                key_id = _new_key_id()
        return KeyRing([(key_id, secrets.token_bytes(_KEY_BYTES)), *self._keys.items()])

    # -- sealing -------------------------------------------------------------------------------

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """Encrypt ``plaintext`` under the primary key, bound to store ``key`` and ``field``.

        Every call draws a fresh random nonce, so sealing one value twice gives two different
        ciphertexts; both open to the same plaintext.
        """
        if not isinstance(plaintext, str):
            raise TypeError(f"only str values can be sealed, not {type(plaintext).__name__}")
        associated_data = _associated_data(key, field)
        if associated_data is None:
            raise ConfigurationError(
                "key and field must be valid text without NUL characters to be sealed"
            )
        try:
            data = plaintext.encode("utf-8")
        except UnicodeEncodeError:
            # from None: the exception object holds the whole plaintext.
            raise CredentialsError(
                f"{field} cannot be sealed: it is not valid Unicode text", field=field
            ) from None
        # Random 96-bit nonces are safe for about 2**32 seals per key; rotation resets the count.
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aeads[self.primary_id].encrypt(nonce, data, associated_data)
        return f"{_PREFIX}{self.primary_id}:{_b64encode(nonce + sealed)}"

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """The plaintext of a value :meth:`seal` returned for the same ``key`` and ``field``.

        Raises :class:`DecryptionError` with one fixed message for every failure (malformed
        value, unknown key id, wrong key, tampering, another key or field), so that neither a
        log reader nor an attacker learns which check failed.
        """
        plaintext = self._open(sealed, key=key, field=field)
        if plaintext is None:
            raise DecryptionError(_DECRYPTION_FAILED) from None
        return plaintext

    def _open(self, sealed: object, *, key: str, field: str) -> str | None:
        if not isinstance(sealed, str) or not sealed.startswith(_PREFIX):
            return None
        key_id, colon, body = sealed[len(_PREFIX) :].partition(":")
        aead = self._aeads.get(key_id)
        associated_data = _associated_data(key, field)
        raw = _b64decode(body)
        if (
            not colon
            or aead is None
            or associated_data is None
            or raw is None
            or len(raw) < _NONCE_BYTES + _TAG_BYTES
        ):
            return None
        try:
            data = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated_data)
            return data.decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            return None

    @staticmethod
    def is_sealed(value: str) -> bool:
        """Whether ``value`` looks sealed: it has the ``ck1:`` prefix (nothing else is checked)."""
        return value.startswith(_PREFIX)

    def needs_rekey(self, value: str) -> bool:
        """Whether ``value`` is plain text, or sealed under a key other than the primary one."""
        if not self.is_sealed(value):
            return True
        key_id, _, _ = value[len(_PREFIX) :].partition(":")
        return key_id != self.primary_id

    def reseal(self, value: str, *, key: str, field: str) -> str:
        """``value`` sealed under the primary key: opened first if sealed, else sealed as is.

        Raises :class:`DecryptionError` when a sealed ``value`` does not open with this ring.
        """
        plaintext = self.unseal(value, key=key, field=field) if self.is_sealed(value) else value
        return self.seal(plaintext, key=key, field=field)


def _validate(keys: Iterable[tuple[str, bytes]], *, source: str) -> dict[str, bytes]:
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise ConfigurationError(
            f"{source} must be built from (key id, {_KEY_BYTES} bytes) pairs, not "
            f"{type(keys).__name__}; use KeyRing.parse(), KeyRing.from_env() or KeyRing.generate()"
        )
    checked: dict[str, bytes] = {}
    for position, entry in enumerate(keys, start=1):
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ConfigurationError(
                f"entry {position} in {source} must be a (key id, {_KEY_BYTES} bytes) pair, "
                f"not {type(entry).__name__}"
            )
        key_id, key = entry
        _check_key_id(key_id, position, source=source)
        if key_id in checked:
            raise ConfigurationError(
                f"key id {key_id!r} appears twice in {source}; give every key its own id"
            )
        if not isinstance(key, bytes):
            raise ConfigurationError(
                f"key {key_id!r} in {source} must be {_KEY_BYTES} raw bytes, "
                f"not {type(key).__name__}; use KeyRing.parse() for base64url text"
            )
        if len(key) != _KEY_BYTES:
            raise ConfigurationError(
                f"key {key_id!r} in {source} is {len(key)} bytes long; keys must be exactly "
                f"{_KEY_BYTES} bytes (256 bits): generate one with `credkeeper keygen`"
            )
        checked[key_id] = key
    if not checked:
        raise ConfigurationError(f"{source} holds no keys; generate one with `credkeeper keygen`")
    return checked


def _check_key_id(key_id: object, position: int, *, source: str) -> None:
    if not isinstance(key_id, str):
        raise ConfigurationError(
            f"key id of entry {position} in {source} must be a str, not {type(key_id).__name__}"
        )
    if not _KEY_ID.fullmatch(key_id):
        # A long "id" may be a key written without one; name it by position, not by value.
        named = repr(key_id) if len(key_id) <= _MAX_ID_LENGTH else f"of entry {position}"
        raise ConfigurationError(f"key id {named} in {source} is not valid; {_ID_RULE}")


def _new_key_id() -> str:
    return "k" + secrets.token_hex(4)


def _associated_data(key: str, field: str) -> bytes | None:
    # NUL separates key from field: were it allowed inside them, ("a\0b", "c") and
    # ("a", "b\0c") would share associated data and a value could move between them.
    if not isinstance(key, str) or not isinstance(field, str) or "\x00" in key + field:
        return None
    try:
        return _AD_PREFIX + key.encode("utf-8") + b"\x00" + field.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    # urlsafe_b64decode skips characters outside the alphabet; check them first.
    if not _BASE64URL.fullmatch(text):
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        return None
    # One canonical spelling per value: reject encodings whose unused low bits are set.
    return data if _b64encode(data) == text else None


def key_file(value: str) -> Path | None:
    """The key file a key setting names, or None when it is key text.

    ``@PATH`` is a key file; so is one line without ``:`` that contains ``/`` or starts with
    ``~`` or ``.``. Key text always has ``id:key`` entries, and may carry ``#`` comments with
    anything in them: taken for a path, it would be echoed, keys and all, by the error saying
    the file cannot be read.
    """
    if value.startswith("@"):
        return Path(value[1:]).expanduser()
    if ":" in value or "\n" in value:
        return None
    if "/" in value or os.sep in value or value.startswith(("~", ".")):
        return Path(value).expanduser()
    return None
