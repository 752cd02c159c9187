"""KeyRing: sealing token fields at rest with named AES-256-GCM keys."""

from __future__ import annotations

import base64
import copy
import os
import pickle
import re
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from credkeeper import ConfigurationError, CredentialsError, DecryptionError
from credkeeper._keyring import KeyRing

TOKEN = "sk-ant-oat01-plaintext-access-token"
KEY = "user-1"
FIELD = "access_token"
MESSAGE = "a sealed value could not be decrypted; wrong key ring, or the value was altered or moved"
RAW_KEY = bytes(range(32))
ENCODED_KEY = base64.urlsafe_b64encode(RAW_KEY).rstrip(b"=").decode()

# One ring for the property tests: hypothesis reruns a test body, not its fixtures.
RING = KeyRing.generate("prop")
# Plaintexts are any valid text; keys and fields also lack NUL, the associated data separator.
TEXT = st.text(alphabet=st.characters(codec="utf-8"))
TEXT_WITHOUT_NUL = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"))


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate("k1")


def decode_body(sealed: str) -> bytes:
    body = sealed.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def with_body(sealed: str, raw: bytes) -> str:
    head = sealed.rsplit(":", 1)[0]
    return f"{head}:{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}"


class TestSeal:
    def test_round_trip(self, ring: KeyRing) -> None:
        """A sealed value opens to its plaintext."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        assert TOKEN == ring.unseal(sealed, key=KEY, field=FIELD)

    def test_format(self, ring: KeyRing) -> None:
        """A sealed value is ck1, the key id and unpadded base64url of nonce, ciphertext, tag."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        prefix, key_id, body = sealed.split(":")
        assert ("ck1", "k1") == (prefix, key_id)
        assert 12 + len(TOKEN) + 16 == len(decode_body(sealed))
        assert "=" not in body

    def test_ciphertext_hides_plaintext(self, ring: KeyRing) -> None:
        """Neither the plaintext nor any long piece of it shows in the sealed value."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        assert [] == [part for part in TOKEN.split("-") if len(part) > 3 and part in sealed]
        assert TOKEN.encode() not in decode_body(sealed)

    def test_fresh_nonce_each_seal(self, ring: KeyRing) -> None:
        """Sealing the same value twice gives two different ciphertexts."""
        first = ring.seal(TOKEN, key=KEY, field=FIELD)
        second = ring.seal(TOKEN, key=KEY, field=FIELD)

        assert first != second
        assert decode_body(first)[:12] != decode_body(second)[:12]

    def test_empty_plaintext_round_trips(self, ring: KeyRing) -> None:
        """The empty string seals and opens like any other value."""
        sealed = ring.seal("", key=KEY, field=FIELD)

        assert "" == ring.unseal(sealed, key=KEY, field=FIELD)

    def test_nul_in_key_refused(self, ring: KeyRing) -> None:
        """A key holding NUL is refused: it would make associated data ambiguous."""
        with pytest.raises(ConfigurationError, match="NUL"):
            ring.seal(TOKEN, key="user\x00access_token", field=FIELD)

    def test_invalid_unicode_refused(self, ring: KeyRing) -> None:
        """A plaintext holding a lone surrogate is refused, naming the field."""
        with pytest.raises(CredentialsError, match="access_token") as caught:
            ring.seal("secret\ud800value", key=KEY, field=FIELD)

        assert "secret" not in str(caught.value)

    def test_non_text_refused(self, ring: KeyRing) -> None:
        """Only str values can be sealed."""
        with pytest.raises(TypeError, match="bytes"):
            ring.seal(b"token", key=KEY, field=FIELD)  # type: ignore[arg-type]


class TestUnseal:
    def test_moved_to_another_key_fails(self, ring: KeyRing) -> None:
        """A value copied to another store key does not open."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        with pytest.raises(DecryptionError):
            ring.unseal(sealed, key="user-2", field=FIELD)

    def test_moved_to_another_field_fails(self, ring: KeyRing) -> None:
        """A value copied from one token field to the other does not open."""
        sealed = ring.seal(TOKEN, key=KEY, field="access_token")

        with pytest.raises(DecryptionError):
            ring.unseal(sealed, key=KEY, field="refresh_token")

    @pytest.mark.parametrize("position", [0, 11, 12, -17, -1], ids=str)
    def test_tampered_byte_fails(self, ring: KeyRing, position: int) -> None:
        """Flipping one bit anywhere in nonce, ciphertext or tag makes the value fail."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)
        raw = bytearray(decode_body(sealed))
        raw[position] ^= 0x01

        with pytest.raises(DecryptionError):
            ring.unseal(with_body(sealed, bytes(raw)), key=KEY, field=FIELD)

    def test_unknown_key_id_fails(self, ring: KeyRing) -> None:
        """A value naming a key id the ring lacks does not open."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD).replace("ck1:k1:", "ck1:k9:")

        with pytest.raises(DecryptionError):
            ring.unseal(sealed, key=KEY, field=FIELD)

    @pytest.mark.parametrize(
        "sealed",
        ["", "plain-token", "ck1:", "ck1:k1", "ck1:k1:", "ck1:k1:not*base64", "ck1:k1:AAAA", "x"],
    )
    def test_malformed_value_fails(self, ring: KeyRing, sealed: str) -> None:
        """Malformed values fail with the same opaque error."""
        with pytest.raises(DecryptionError) as caught:
            ring.unseal(sealed, key=KEY, field=FIELD)

        assert MESSAGE == str(caught.value)

    def test_padded_body_fails(self, ring: KeyRing) -> None:
        """Only the canonical, unpadded spelling of a sealed value opens."""
        sealed = ring.seal("abcd", key=KEY, field=FIELD)

        with pytest.raises(DecryptionError):
            ring.unseal(sealed + "==", key=KEY, field=FIELD)

    def test_wrong_ring_is_opaque(self, ring: KeyRing) -> None:
        """A wrong ring gives the fixed message, no plaintext, no key, no chained cause."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)
        other = KeyRing.generate("k1")

        with pytest.raises(DecryptionError) as caught:
            other.unseal(sealed, key=KEY, field=FIELD)

        text = f"{caught.value} {caught.value!r}"
        assert MESSAGE == str(caught.value)
        assert TOKEN not in text
        keys = [one.export().partition(":")[2] for one in (ring, other)]
        assert [] == [encoded for encoded in keys if encoded in text]
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__

    def test_older_key_opens(self, ring: KeyRing) -> None:
        """A value sealed under a key that is no longer primary still opens."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        assert TOKEN == ring.rotated().unseal(sealed, key=KEY, field=FIELD)


class TestRotation:
    def test_rotated_seals_under_new_primary(self, ring: KeyRing) -> None:
        """A rotated ring seals under its new key and keeps the old one for reading."""
        rotated = ring.rotated("k2")

        assert ("k2", "k1") == rotated.key_ids
        assert rotated.seal(TOKEN, key=KEY, field=FIELD).startswith("ck1:k2:")

    def test_rotated_default_id(self, ring: KeyRing) -> None:
        """Without an id, the new primary is named k and 8 hex digits."""
        rotated = ring.rotated()

        assert re.fullmatch(r"k[0-9a-f]{8}", rotated.primary_id)

    def test_rotated_leaves_original(self, ring: KeyRing) -> None:
        """Rotation returns a new ring; the original is unchanged."""
        ring.rotated("k2")

        assert ("k1",) == ring.key_ids

    def test_rotated_id_clash_refused(self, ring: KeyRing) -> None:
        """Rotating to an id already in the ring is refused."""
        with pytest.raises(ConfigurationError, match="'k1' appears twice"):
            ring.rotated("k1")

    def test_needs_rekey(self, ring: KeyRing) -> None:
        """Plain values and values under an older key need rekeying; primary ones do not."""
        old = ring.seal(TOKEN, key=KEY, field=FIELD)
        rotated = ring.rotated("k2")
        current = rotated.seal(TOKEN, key=KEY, field=FIELD)

        assert (True, True, False) == tuple(
            rotated.needs_rekey(value) for value in (TOKEN, old, current)
        )

    def test_reseal_old_value(self, ring: KeyRing) -> None:
        """Resealing moves a value to the primary key with the same plaintext."""
        rotated = ring.rotated("k2")
        resealed = rotated.reseal(ring.seal(TOKEN, key=KEY, field=FIELD), key=KEY, field=FIELD)

        assert resealed.startswith("ck1:k2:")
        assert TOKEN == rotated.unseal(resealed, key=KEY, field=FIELD)

    def test_reseal_plain_value(self, ring: KeyRing) -> None:
        """Resealing a plain value seals it."""
        resealed = ring.reseal(TOKEN, key=KEY, field=FIELD)

        assert TOKEN == ring.unseal(resealed, key=KEY, field=FIELD)

    def test_is_sealed(self, ring: KeyRing) -> None:
        """is_sealed tells sealed values from plain ones by their prefix."""
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        assert (True, False) == (KeyRing.is_sealed(sealed), KeyRing.is_sealed(TOKEN))


class TestConstruction:
    def test_first_key_is_primary(self) -> None:
        """The first key given is the primary one."""
        ring = KeyRing([("new", RAW_KEY), ("old", bytes(32))])

        assert ("new", ("new", "old")) == (ring.primary_id, ring.key_ids)

    def test_no_keys_refused(self) -> None:
        """A ring needs at least one key."""
        with pytest.raises(ConfigurationError, match="credkeeper keygen"):
            KeyRing([])

    def test_short_key_refused(self) -> None:
        """A key that is not 32 bytes is refused, naming its id and not its bytes."""
        with pytest.raises(ConfigurationError, match=r"'k1'.*16 bytes") as caught:
            KeyRing([("k1", RAW_KEY[:16])])

        assert repr(RAW_KEY[:16]) not in str(caught.value)

    def test_text_key_refused(self) -> None:
        """A key given as text rather than bytes is refused, pointing at parse()."""
        with pytest.raises(ConfigurationError, match=r"'k1'.*KeyRing\.parse"):
            KeyRing([("k1", ENCODED_KEY)])  # type: ignore[list-item]

    @pytest.mark.parametrize("key_id", ["", "has space", "dot.ted", "x" * 33, "é"])
    def test_bad_id_refused(self, key_id: str) -> None:
        """A key id outside [A-Za-z0-9_-]{1,32} is refused."""
        with pytest.raises(ConfigurationError, match="key ids are 1 to 32 characters"):
            KeyRing([(key_id, RAW_KEY)])

    def test_generate_default_id(self) -> None:
        """A generated key is named k and 8 random hex digits."""
        first, second = KeyRing.generate(), KeyRing.generate()

        assert re.fullmatch(r"k[0-9a-f]{8}", first.primary_id)
        assert first.primary_id != second.primary_id

    def test_generate_keys_differ(self) -> None:
        """Two generated keys with the same id are different keys."""
        first, second = KeyRing.generate("k1"), KeyRing.generate("k1")

        assert first.export() != second.export()


class TestParse:
    def test_export_parse_round_trip(self, ring: KeyRing) -> None:
        """Parsing an export gives a ring that opens the same values."""
        rotated = ring.rotated("k2")
        sealed = ring.seal(TOKEN, key=KEY, field=FIELD)

        parsed = KeyRing.parse(rotated.export())

        assert rotated.export() == parsed.export()
        assert ("k2", "k1") == parsed.key_ids
        assert TOKEN == parsed.unseal(sealed, key=KEY, field=FIELD)

    def test_export_format(self) -> None:
        """Export writes id:unpadded-base64url, one key per line, primary first."""
        ring = KeyRing([("a", RAW_KEY), ("b", bytes(32))])

        assert f"a:{ENCODED_KEY}\nb:{'A' * 43}" == ring.export()

    def test_separators_comments_and_padding(self) -> None:
        """Commas, whitespace, comments and optional padding are all understood."""
        text = f"# primary first\n a:{ENCODED_KEY}=, b:{'A' * 43}  # old\n\n"

        assert ("a", "b") == KeyRing.parse(text).key_ids

    def test_comma_separated(self) -> None:
        """A single line of comma-separated entries parses, as in an environment variable."""
        assert ("a", "b") == KeyRing.parse(f"a:{ENCODED_KEY},b:{'A' * 43}").key_ids

    def test_empty_text_refused(self) -> None:
        """Text with no entries is refused."""
        with pytest.raises(ConfigurationError, match="no keys"):
            KeyRing.parse("# nothing here\n")

    def test_bad_length_names_id(self) -> None:
        """A key of the wrong length is named by its id, without its bytes or text."""
        short = base64.urlsafe_b64encode(RAW_KEY[:20]).decode()

        with pytest.raises(ConfigurationError, match=r"'short'.*20 bytes") as caught:
            KeyRing.parse(f"short:{short}")

        assert [] == [leak for leak in (short, repr(RAW_KEY[:20])) if leak in str(caught.value)]

    def test_bad_id_names_id(self) -> None:
        """An invalid key id is named, and the key is not shown."""
        with pytest.raises(ConfigurationError, match=r"'bad\.id'") as caught:
            KeyRing.parse(f"bad.id:{ENCODED_KEY}")

        assert ENCODED_KEY not in str(caught.value)

    def test_duplicate_id_names_id(self) -> None:
        """A key id given twice is named, and neither key is shown."""
        with pytest.raises(ConfigurationError, match="'k1' appears twice") as caught:
            KeyRing.parse(f"k1:{ENCODED_KEY}\nk1:{'A' * 43}")

        assert [] == [leak for leak in (ENCODED_KEY, "A" * 43) if leak in str(caught.value)]

    def test_missing_id_does_not_echo(self) -> None:
        """An entry without an id is named by position, since it is likely a bare key."""
        with pytest.raises(ConfigurationError, match=r"entry 2 .* has no key id") as caught:
            KeyRing.parse(f"a:{'A' * 43} {ENCODED_KEY}")

        assert ENCODED_KEY not in str(caught.value)

    def test_swapped_entry_does_not_echo(self) -> None:
        """A key written before its id is named by position, not echoed as an id."""
        with pytest.raises(ConfigurationError, match="key id of entry 1") as caught:
            KeyRing.parse(f"{ENCODED_KEY}:k1")

        assert ENCODED_KEY not in str(caught.value)

    @pytest.mark.parametrize(
        "encoded", ["+/" + ENCODED_KEY[2:], ENCODED_KEY[:-1] + "*", ENCODED_KEY + ":x"]
    )
    def test_not_base64url_refused(self, encoded: str) -> None:
        """A key that is not base64url is refused, naming its id."""
        with pytest.raises(ConfigurationError, match=r"'k1' .*not valid base64url") as caught:
            KeyRing.parse(f"k1:{encoded}")

        assert encoded not in str(caught.value)


class TestFromEnv:
    def test_reads_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The default variable CREDKEEPER_KEYS holds the ring."""
        monkeypatch.setenv("CREDKEEPER_KEYS", f"k1:{ENCODED_KEY}")

        assert ("k1",) == KeyRing.from_env().key_ids

    def test_unset_names_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unset variable is named in the error, with the keygen command."""
        monkeypatch.delenv("MY_KEYS", raising=False)

        with pytest.raises(ConfigurationError, match=r"MY_KEYS.*credkeeper keygen"):
            KeyRing.from_env("MY_KEYS")

    def test_empty_names_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An empty variable is refused like an unset one."""
        monkeypatch.setenv("CREDKEEPER_KEYS", "  ")

        with pytest.raises(ConfigurationError, match=r"CREDKEEPER_KEYS.*credkeeper keygen"):
            KeyRing.from_env()

    def test_parse_error_names_variable(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bad entry in the variable is reported with the variable's name."""
        monkeypatch.setenv("CREDKEEPER_KEYS", "k1:AAAA")

        with pytest.raises(ConfigurationError, match="'k1' in environment variable CREDKEEPER"):
            KeyRing.from_env()

    @pytest.mark.parametrize("form", ["@{path}", "{path}", "@~/keys", "~/keys"])
    def test_names_a_key_file_as_the_command_line_does(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, form: str
    ) -> None:
        """@PATH, or a value that is a path, reads the key file, ~ expanded: as CREDKEEPER_KEYS
        is read by the command line, so an application shares its settings."""
        keys = tmp_path / "keys"
        keys.write_text(f"# credkeeper keys\nk1:{ENCODED_KEY}\n")
        keys.chmod(0o600)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("CREDKEEPER_KEYS", form.format(path=keys))

        assert ("k1",) == KeyRing.from_env().key_ids

    def test_key_text_with_a_slash_in_a_comment_is_key_text(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A comment mentioning a date or a path does not make key text a file name (whose
        error would echo the keys)."""
        monkeypatch.setenv("CREDKEEPER_KEYS", f"# prod keys, rotated 2024/05/01\nk1:{ENCODED_KEY}")

        assert ("k1",) == KeyRing.from_env().key_ids

    def test_a_missing_key_file_is_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A key file that cannot be read is named in the error."""
        monkeypatch.setenv("CREDKEEPER_KEYS", f"@{tmp_path / 'absent'}")

        with pytest.raises(ConfigurationError, match=r"cannot read key file .*absent"):
            KeyRing.from_env()


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
class TestFromFile:
    def write(self, path: Path, mode: int) -> Path:
        path.write_text(f"# credkeeper keys\nk1:{ENCODED_KEY}\n")
        path.chmod(mode)
        return path

    def test_private_file_reads(self, tmp_path: Path) -> None:
        """A chmod 600 key file loads."""
        path = self.write(tmp_path / "keys", 0o600)

        assert ("k1",) == KeyRing.from_file(path).key_ids

    @pytest.mark.parametrize("mode", [0o644, 0o640, 0o620, 0o602])
    def test_shared_file_refused(self, tmp_path: Path, mode: int) -> None:
        """A key file readable or writable by group or others is refused with chmod 600."""
        path = self.write(tmp_path / "keys", mode)

        with pytest.raises(ConfigurationError, match="chmod 600") as caught:
            KeyRing.from_file(path)

        assert ENCODED_KEY not in str(caught.value)

    def test_missing_file_names_path(self, tmp_path: Path) -> None:
        """A key file that cannot be read is named in the error."""
        path = tmp_path / "missing"

        with pytest.raises(ConfigurationError, match="missing"):
            KeyRing.from_file(str(path))

    def test_parse_error_names_file(self, tmp_path: Path) -> None:
        """A bad entry in the file is reported with the file's path."""
        path = tmp_path / "keys"
        path.write_text("k1:AAAA\n")
        path.chmod(0o600)

        with pytest.raises(ConfigurationError, match=r"'k1' in key file .*keys"):
            KeyRing.from_file(path)

    def test_binary_file_refused(self, tmp_path: Path) -> None:
        """A key file that is not UTF-8 text is refused without showing its bytes."""
        path = tmp_path / "keys"
        path.write_bytes(RAW_KEY + b"\xff")
        path.chmod(0o600)

        with pytest.raises(ConfigurationError, match="not UTF-8") as caught:
            KeyRing.from_file(path)

        assert caught.value.__cause__ is None


class TestSecrecy:
    def test_repr_hides_keys(self) -> None:
        """repr shows the ids and the primary, never key material."""
        ring = KeyRing([("new", RAW_KEY), ("old", bytes(32))])

        assert "KeyRing(primary_id='new', key_ids=('new', 'old'))" == repr(ring)

    def test_pickling_refused(self, ring: KeyRing) -> None:
        """A ring cannot be pickled, so keys do not travel to other processes unnoticed."""
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(ring)

    def test_copy_is_same_ring(self, ring: KeyRing) -> None:
        """Copying an immutable ring gives the ring itself."""
        assert (ring, ring) == (copy.copy(ring), copy.deepcopy(ring))


class TestProperties:
    @given(plaintext=TEXT, key=TEXT_WITHOUT_NUL, field=TEXT_WITHOUT_NUL)
    def test_round_trip(self, plaintext: str, key: str, field: str) -> None:
        """Any text sealed for any key and field opens to itself."""
        sealed = RING.seal(plaintext, key=key, field=field)

        assert plaintext == RING.unseal(sealed, key=key, field=field)

    @given(plaintext=TEXT, key=TEXT_WITHOUT_NUL, field=TEXT_WITHOUT_NUL, data=st.data())
    def test_other_key_or_field_fails(
        self, plaintext: str, key: str, field: str, data: st.DataObject
    ) -> None:
        """Any sealed value fails to open under any other key, field, or both."""
        # Keeping one of the two often checks that each alone is bound.
        other_key = data.draw(st.one_of(st.just(key), st.text()), label="other_key")
        other_field = data.draw(st.one_of(st.just(field), st.text()), label="other_field")
        assume((other_key, other_field) != (key, field))
        sealed = RING.seal(plaintext, key=key, field=field)

        with pytest.raises(DecryptionError):
            RING.unseal(sealed, key=other_key, field=other_field)
