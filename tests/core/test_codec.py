"""Token fields kept the application's way: its own codec, or plain text by declaration."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from credkeeper import (
    AsyncTokenManager,
    ConfigurationError,
    DecryptionError,
    KeyRing,
    MemoryStore,
    Record,
    RescueJournal,
    StoreUnavailable,
    TokenCodec,
    TokenManager,
    rekey,
)
from credkeeper._record import check_key
from credkeeper._store import ThreadOffloadStore
from credkeeper.testing import FakeClock, FakeProvider
from tests.core.test_engine import stored

KEY = "user-codec"


class ReversingCodec:
    """A toy scheme: base64 of the reversed token, prefixed with the field's initial."""

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """``a:`` or ``r:``, then base64 of the reversed token."""
        return f"{field[0]}:" + base64.b64encode(plaintext[::-1].encode()).decode()

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """The token, if the value was sealed for this field."""
        prefix, _, body = sealed.partition(":")
        if prefix != field[0]:
            raise ValueError(f"not sealed for {field}: {sealed}")
        return base64.b64decode(body).decode()[::-1]


class WrongSecretCodec(ReversingCodec):
    """A codec built with the wrong secret: it seals, but opens nothing, not even its own."""

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """Never opens: the secret does not match."""
        raise ValueError("not a value this secret sealed")


class EchoingCodec(ReversingCodec):
    """A codec whose unseal gives back something other than what seal was given."""

    def unseal(self, sealed: str, *, key: str, field: str) -> str:
        """The stored form itself, not the token."""
        return sealed


class RecordingCodec(ReversingCodec):
    """A working codec that notes every (value, key) it is asked to seal."""

    def __init__(self) -> None:
        self.sealed: list[tuple[str, str]] = []

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """Note the call, then seal as the reversing codec does."""
        self.sealed.append((plaintext, key))
        return super().seal(plaintext, key=key, field=field)


class FlakyCodec(ReversingCodec):
    """A codec whose key service goes away after the manager is built: seal then raises.

    Stands in for a KMS-backed codec losing its service between the provider's answer and the
    store write, which no real service does on demand at that exact moment.
    """

    def __init__(self) -> None:
        self.down = False

    def seal(self, plaintext: str, *, key: str, field: str) -> str:
        """Seal as the reversing codec does, unless the service is down."""
        if self.down:
            raise ConnectionError(f"key service unreachable while sealing {plaintext}")
        return super().seal(plaintext, key=key, field=field)


class PlaintextStore(MemoryStore):
    """A memory store declared plaintext, as a mapped table with ``plaintext=true`` is."""

    plaintext = True


def is_valid_key(key: str) -> bool:
    """Whether ``key`` could name a credential."""
    try:
        check_key(key)
    except ConfigurationError:
        return False
    return True


def manager(
    store: MemoryStore, fake: FakeProvider, clock: FakeClock, tmp: Path, **options: object
) -> TokenManager:
    """A manager on ``store`` with the fake provider and clock."""
    return TokenManager(store, fake.provider(), journal=tmp / "journal", clock=clock, **options)  # type: ignore[arg-type]


class TestApplicationCodec:
    def test_refreshed_tokens_are_stored_as_the_codec_seals_them(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """After a refresh the store holds codec.seal(token) for each field."""
        store = MemoryStore()
        tokens = manager(store, fake, clock, tmp_path, codec=ReversingCodec())
        tokens.put(KEY, fake.issue(expires_in=0))

        fresh = tokens.get(KEY)
        codec = ReversingCodec()

        assert (
            codec.seal(fresh.access_token.get_secret_value(), key=KEY, field="access_token"),
            codec.seal(fresh.refresh_token.get_secret_value(), key=KEY, field="refresh_token"),
        ) == (stored(store, KEY).access_token, stored(store, KEY).refresh_token)

    def test_a_value_the_codec_cannot_open_is_one_opaque_error(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A codec failure names the key and field, never the stored value."""
        store = MemoryStore()
        store.put(
            Record(key=KEY, access_token="x:garbage", refresh_token="r:", expires_at=clock.now())
        )
        tokens = manager(store, fake, clock, tmp_path, codec=ReversingCodec())

        with pytest.raises(DecryptionError) as caught:
            tokens.get(KEY)

        assert "access_token under key 'user-codec'" in str(caught.value)
        assert "garbage" not in str(caught.value)

    def test_the_key_ring_still_seals_the_journal(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """With a codec and a key ring, the journal keeps no key file of its own."""
        tokens = manager(
            MemoryStore(), fake, clock, tmp_path, codec=ReversingCodec(), keyring=KeyRing.generate()
        )
        tokens.put(KEY, fake.issue(expires_in=0))
        tokens.get(KEY)

        assert not (tmp_path / "journal" / "journal.key").exists()

    def test_an_object_without_seal_and_unseal_is_refused(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """codec= must look like a TokenCodec."""
        with pytest.raises(ConfigurationError, match="TokenCodec"):
            TokenManager(MemoryStore(), fake.provider(), journal=tmp_path, codec=object())  # type: ignore[arg-type]

    def test_the_key_ring_is_a_codec(self) -> None:
        """KeyRing satisfies the TokenCodec protocol, so both take one path."""
        assert isinstance(KeyRing.generate(), TokenCodec)

    def test_a_key_ring_given_as_the_codec_opens_what_it_sealed(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """codec=KeyRing(...) round-trips: a refresh, then a read of the sealed tokens."""
        tokens = manager(
            MemoryStore(), fake, clock, tmp_path, codec=KeyRing.generate(), cache=False
        )
        tokens.put(KEY, fake.issue(expires_in=0))
        fresh = tokens.get(KEY)

        assert fresh == tokens.get(KEY)


class TestCodecProbe:
    def test_a_codec_that_cannot_open_what_it_seals_is_refused_at_construction(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """TokenManager tries the codec once and names it when the round trip fails."""
        with pytest.raises(ConfigurationError, match="the codec WrongSecretCodec failed its check"):
            TokenManager(MemoryStore(), fake.provider(), journal=tmp_path, codec=WrongSecretCodec())

    def test_the_async_manager_refuses_it_too(self, fake: FakeProvider, tmp_path: Path) -> None:
        """AsyncTokenManager runs the same check when it is built."""
        with pytest.raises(ConfigurationError, match="the codec WrongSecretCodec failed its check"):
            AsyncTokenManager(
                MemoryStore(), fake.provider(), journal=tmp_path, codec=WrongSecretCodec()
            )

    def test_a_codec_that_gives_back_another_value_is_refused(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A round trip that does not return the value sealed fails the check."""
        with pytest.raises(ConfigurationError, match="did not give back the value"):
            TokenManager(MemoryStore(), fake.provider(), journal=tmp_path, codec=EchoingCodec())

    def test_the_check_uses_a_key_no_credential_can_have(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """The probe's key is one check_key refuses, so it never meets a real credential."""
        codec = RecordingCodec()
        TokenManager(MemoryStore(), fake.provider(), journal=tmp_path, codec=codec)

        assert {False} == {is_valid_key(key) for _, key in codec.sealed}


class TestSealFailureAfterRefresh:
    def failed_refresh(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> tuple[MemoryStore, pytest.ExceptionInfo[StoreUnavailable]]:
        """A refresh whose store write fails because the codec stopped sealing."""
        store = MemoryStore()
        codec = FlakyCodec()
        tokens = manager(store, fake, clock, tmp_path, codec=codec)
        tokens.put(KEY, fake.issue(expires_in=0))
        codec.down = True
        with pytest.raises(StoreUnavailable) as caught:
            tokens.get(KEY)
        return store, caught

    def test_the_caller_is_told_the_tokens_are_kept_in_the_journal(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The error is a store write's: the new tokens are in the rescue journal."""
        _, caught = self.failed_refresh(fake, clock, tmp_path)

        assert (
            "the new tokens for key 'user-codec' were not stored (the codec FlakyCodec could "
            "not seal the access_token for key 'user-codec' (ConnectionError)); they are kept "
            "in the rescue journal and will be written on the next use of the key"
        ) == str(caught.value)

    def test_no_token_is_in_the_error(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The codec's own message quotes the token; the caller's error does not."""
        _, caught = self.failed_refresh(fake, clock, tmp_path)

        assert set() == {token for token in fake.all_tokens() if token in str(caught.value)}

    def test_the_journal_holds_the_new_tokens(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The provider's answer, which the store did not take, is in the rescue journal."""
        self.failed_refresh(fake, clock, tmp_path)

        entries = RescueJournal(tmp_path / "journal").pending(KEY)

        assert ["current"] == [
            fake.refresh_token_state(entry.credentials.refresh_token) for entry in entries
        ]

    def test_a_manager_with_a_working_codec_writes_them_without_a_refresh(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The next manager replays the journal: the new tokens, from one provider refresh."""
        store, _ = self.failed_refresh(fake, clock, tmp_path)
        (entry,) = RescueJournal(tmp_path / "journal").pending(KEY)

        fresh = manager(store, fake, clock, tmp_path, codec=ReversingCodec()).get(KEY)

        assert (1, entry.credentials, fresh.refresh_token.get_secret_value()) == (
            fake.refresh_count,
            fresh,
            ReversingCodec().unseal(
                stored(store, KEY).refresh_token, key=KEY, field="refresh_token"
            ),
        )


class TestPlaintextStore:
    def test_tokens_stay_plain_although_a_key_ring_is_given(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A plaintext store gets the refreshed tokens as they are; the ring seals the journal."""
        store = PlaintextStore()
        tokens = manager(store, fake, clock, tmp_path, keyring=KeyRing.generate())
        tokens.put(KEY, fake.issue(expires_in=0))

        fresh = tokens.get(KEY)

        assert (
            fresh.access_token.get_secret_value(),
            fresh.refresh_token.get_secret_value(),
        ) == (stored(store, KEY).access_token, stored(store, KEY).refresh_token)

    def test_values_sealed_before_are_opened_and_written_back_plain(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A store switched to plaintext still reads what the key ring sealed, then stores plain."""
        ring = KeyRing.generate()
        store = PlaintextStore()
        login = fake.issue(expires_in=0)
        store.put(
            Record(
                key=KEY,
                access_token=ring.seal(
                    login.access_token.get_secret_value(), key=KEY, field="access_token"
                ),
                refresh_token=ring.seal(
                    login.refresh_token.get_secret_value(), key=KEY, field="refresh_token"
                ),
                expires_at=login.expires_at,
            )
        )

        fresh = manager(store, fake, clock, tmp_path, keyring=ring).get(KEY)

        assert ("current", fresh.refresh_token.get_secret_value()) == (
            fake.refresh_token_state(fresh.refresh_token),
            stored(store, KEY).refresh_token,
        )

    def test_a_codec_for_a_plaintext_store_is_refused(
        self, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """Declaring a store plaintext and giving a codec contradict each other."""
        with pytest.raises(ConfigurationError, match="declared plaintext"):
            TokenManager(
                PlaintextStore(), fake.provider(), journal=tmp_path, codec=ReversingCodec()
            )

    @pytest.mark.anyio
    async def test_the_declaration_survives_the_thread_offload_wrapper(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """An async manager on a wrapped plaintext store still writes plain tokens."""
        store = PlaintextStore()
        tokens = AsyncTokenManager(
            ThreadOffloadStore(store),
            fake.provider(),
            keyring=KeyRing.generate(),
            journal=tmp_path / "journal",
            clock=clock,
        )
        login = fake.issue()
        await tokens.put(KEY, login)

        assert login.refresh_token.get_secret_value() == stored(store, KEY).refresh_token

    def test_rekey_of_a_plaintext_store_is_refused(self) -> None:
        """There is nothing to re-seal in a store that keeps tokens as they are."""
        with pytest.raises(ConfigurationError, match="nothing to re-seal"):
            rekey(PlaintextStore(), KeyRing.generate())
