"""Settings: the one loader of CREDKEEPER_* variables, and the provider setting it reads."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from credkeeper import (
    AsyncTokenManager,
    ConfigurationError,
    KeyRing,
    MemoryStore,
    Provider,
    Secret,
    Settings,
    TokenManager,
)
from credkeeper._provider import (
    CLAUDE_CODE_CLIENT_ID,
    CLAUDE_CODE_SCOPE,
    CLAUDE_CODE_TOKEN_URL,
    WRAPPER_GUIDE_TOKEN_URL,
)
from credkeeper._settings import ENVIRONMENT, default_store_path
from credkeeper._wrapper import DEFAULT_WRAPPER_URL
from credkeeper.testing import FakeClock, FakeProvider

KEY = "alice"
KEY_TEXT = KeyRing.generate("k1").export()
CLIENT_SECRET = "client-SECRET-value-42"
TOKEN_URL = "https://auth.example.com/oauth/token"
EXAMPLE = "oauth2+https://auth.example.com/oauth/token?client_id=ID"
PROVIDER = "--provider (CREDKEEPER_PROVIDER)"
SECRET_VARIABLE = "CREDKEEPER_PROVIDER_CLIENT_SECRET"


@pytest.fixture(autouse=True)
def no_settings_in_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No CREDKEEPER_* variable from the environment running the tests, and a private home."""
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))


def settings(tmp_path: Path, provider: str, **others: object) -> Settings:
    """Settings on a memory store, a key ring and a journal in the test's directory."""
    return Settings(
        store="memory://",
        keys=KEY_TEXT,
        provider=provider,
        journal=tmp_path / "journal",
        **others,  # type: ignore[arg-type]
    )


class TestFromEnv:
    def test_each_variable_gives_its_setting(self, tmp_path: Path) -> None:
        """Every CREDKEEPER_* variable gives the setting of its name."""
        environ = {
            "CREDKEEPER_STORE": "memory://",
            "CREDKEEPER_KEYS": KEY_TEXT,
            "CREDKEEPER_CODEC": "myapp.tokens:make_codec",
            "CREDKEEPER_PROVIDER": f"oauth2+{TOKEN_URL}?client_id=app",
            SECRET_VARIABLE: CLIENT_SECRET,
            "CREDKEEPER_JOURNAL": str(tmp_path / "journal"),
            "CREDKEEPER_WRAPPER_URL": "https://wrapper.example.com",
        }

        assert Settings(
            store="memory://",
            keys=KEY_TEXT,
            codec="myapp.tokens:make_codec",
            provider=f"oauth2+{TOKEN_URL}?client_id=app",
            client_secret=Secret(CLIENT_SECRET),
            journal=tmp_path / "journal",
            wrapper_url="https://wrapper.example.com",
        ) == Settings.from_env(environ)

    def test_without_variables_the_defaults_apply(self) -> None:
        """No variable: the default store, the Claude Code profile, the public wrapper."""
        assert (None, None, "claude-code", None, DEFAULT_WRAPPER_URL) == astuple(
            Settings.from_env({})
        )

    def test_an_argument_replaces_its_variable(self) -> None:
        """A keyword given replaces the variable, as a command-line option does."""
        loaded = Settings.from_env({"CREDKEEPER_STORE": "memory://"}, store="sqlite:///a.db")

        assert "sqlite:///a.db" == loaded.store

    def test_a_none_argument_leaves_the_variable(self) -> None:
        """A keyword given as None stands for an option not given: the variable applies."""
        loaded = Settings.from_env({"CREDKEEPER_STORE": "memory://"}, store=None)

        assert "memory://" == loaded.store

    def test_an_empty_variable_counts_as_unset(self) -> None:
        """An empty variable is no setting: the default applies."""
        loaded = Settings.from_env({"CREDKEEPER_PROVIDER": "", "CREDKEEPER_KEYS": ""})

        assert ("claude-code", None) == (loaded.provider, loaded.keys)

    def test_reads_the_process_environment_by_default(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without ``environ``, the process's own variables are read."""
        monkeypatch.setenv("CREDKEEPER_PROVIDER", "wrapper-guide")

        assert "wrapper-guide" == Settings.from_env().provider

    def test_an_unknown_setting_is_a_type_error(self) -> None:
        """A keyword that is no setting is refused, as any unknown keyword is."""
        with pytest.raises(TypeError, match="'stroe'"):
            Settings.from_env({}, stroe="memory://")


def astuple(loaded: Settings) -> tuple[object, ...]:
    """The settings that have a default, in a tuple."""
    return (loaded.store, loaded.keys, loaded.provider, loaded.journal, loaded.wrapper_url)


class TestSettings:
    def test_blank_values_are_unset(self) -> None:
        """A blank store, key ring or codec is no setting."""
        loaded = Settings(store=" ", keys="", codec="\n")

        assert (None, None, None) == (loaded.store, loaded.keys, loaded.codec)

    def test_the_journal_is_a_path_under_home(self) -> None:
        """The journal directory is a Path, with ``~`` expanded."""
        assert Path.home() / "journal" == Settings(journal="~/journal").journal  # type: ignore[arg-type]

    def test_the_default_store_is_the_file_store_in_xdg_data_home(self, tmp_path: Path) -> None:
        """Without a store, the URL is the default file store's."""
        expected = (tmp_path / "xdg-data" / "credkeeper" / "credentials.json").as_uri()

        assert (expected, expected) == (Settings().store_url, default_store_path().as_uri())

    def test_a_store_password_is_hidden_for_messages(self) -> None:
        """store_display hides the password of the store URL."""
        loaded = Settings(store="postgresql+psycopg://app:s3cret@db.example/creds")

        assert "postgresql+psycopg://app:***@db.example/creds" == loaded.store_display

    def test_a_setting_of_the_wrong_type_is_refused_naming_it(self) -> None:
        """A setting that is not text names its option and variable."""
        with pytest.raises(ConfigurationError) as caught:
            Settings(store=42)  # type: ignore[arg-type]

        assert "--store (CREDKEEPER_STORE) must be a str, not int" == str(caught.value)

    def test_a_client_secret_of_the_wrong_type_is_refused_naming_it(self) -> None:
        """A client secret that is not text is a ConfigurationError naming its variable."""
        with pytest.raises(ConfigurationError, match=r"CREDKEEPER_PROVIDER_CLIENT_SECRET.*not int"):
            Settings(client_secret=42)  # type: ignore[arg-type]

    def test_the_provider_is_checked_when_made(self) -> None:
        """A wrong provider is an error at start-up, naming its option and variable."""
        with pytest.raises(ConfigurationError, match=r"^--provider \(CREDKEEPER_PROVIDER\) must"):
            Settings(provider="github")

    def test_repr_shows_no_key_text_secret_or_password(self) -> None:
        """repr masks key text, the client secret and passwords in URLs."""
        loaded = Settings(
            store="postgresql+psycopg://app:s3cret@db.example/creds",
            keys=KEY_TEXT,
            provider=f"oauth2+{TOKEN_URL}?client_id=app",
            client_secret=Secret(CLIENT_SECRET),
        )

        assert (
            "Settings(store='postgresql+psycopg://app:***@db.example/creds', keys='***', "
            f"codec=None, provider='oauth2+{TOKEN_URL}?client_id=app', client_secret='***', "
            "journal=None, "
            f"wrapper_url='{DEFAULT_WRAPPER_URL}')"
        ) == repr(loaded)

    def test_repr_shows_a_key_file(self) -> None:
        """A key file's path is no secret: repr shows it."""
        assert "keys='@/etc/credkeeper/keys'" in repr(Settings(keys="@/etc/credkeeper/keys"))

    def test_no_key_ring_names_the_fix(self, tmp_path: Path) -> None:
        """Without keys, asking for the key ring says how to make one and where to set it."""
        keys = tmp_path / "xdg-config" / "credkeeper" / "keys"

        with pytest.raises(ConfigurationError) as caught:
            Settings().load_keyring()

        assert (
            f"no key ring: run `credkeeper keygen --output {keys}`, then set "
            f"CREDKEEPER_KEYS=@{keys} (or pass --keys)"
        ) == str(caught.value)

    def test_key_text_gives_the_key_ring(self) -> None:
        """Key text as keygen prints it is the key ring."""
        assert ("k1",) == Settings(keys=KEY_TEXT).load_keyring().key_ids

    def test_without_a_codec_there_is_none(self) -> None:
        """No codec setting: load_codec gives None."""
        assert Settings().load_codec() is None


class TestManagers:
    def test_the_manager_refreshes_with_the_configured_provider(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A manager from settings refreshes at the provider they name, once."""
        with settings(tmp_path, fake.token_url).manager(clock=clock) as manager:
            manager.put(KEY, fake.issue(expires_in=0))

            manager.get(KEY)

        assert 1 == fake.refresh_count

    def test_manager_options_reach_the_manager(self, tmp_path: Path) -> None:
        """Keywords such as leeway go to the manager's constructor."""
        with settings(tmp_path, "claude-code").manager(leeway=60) as manager:
            assert timedelta(seconds=60) == manager.policy.leeway

    def test_a_given_store_is_used(self, tmp_path: Path) -> None:
        """store= puts the manager on a store already open."""
        store = MemoryStore()

        with settings(tmp_path, "claude-code").manager(store=store) as manager:
            assert store is manager.store

    def test_a_store_opened_for_a_manager_that_cannot_be_made_is_closed(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A bad manager option leaves no store open behind it."""
        store = ClosingStore()
        monkeypatch.setattr(Settings, "open_store", lambda self: store)

        with pytest.raises(ConfigurationError):
            settings(tmp_path, "claude-code").manager(leeway=-1)

        assert store.closed

    def test_a_given_store_is_left_to_its_owner(self, tmp_path: Path) -> None:
        """A store passed in is not closed when the manager cannot be made."""
        store = ClosingStore()

        with pytest.raises(ConfigurationError):
            settings(tmp_path, "claude-code").manager(store=store, leeway=-1)

        assert not store.closed

    def test_a_manager_without_a_key_ring_is_refused(self, tmp_path: Path) -> None:
        """Tokens are never written in clear: no keys, no codec, no plaintext store, no manager."""
        with pytest.raises(ConfigurationError, match=r"^no key ring: "):
            Settings(store="memory://", journal=tmp_path / "journal").manager()

    @pytest.mark.usefixtures("configured")
    def test_token_manager_from_env(self, fake: FakeProvider, clock: FakeClock) -> None:
        """TokenManager.from_env() reads the variables the command line reads."""
        with TokenManager.from_env(clock=clock) as manager:
            manager.put(KEY, fake.issue(expires_in=0))
            manager.get(KEY)

        assert 1 == fake.refresh_count

    @pytest.mark.anyio
    @pytest.mark.usefixtures("configured")
    async def test_async_token_manager_from_env(self, fake: FakeProvider, clock: FakeClock) -> None:
        """AsyncTokenManager.from_env() reads the same variables."""
        async with AsyncTokenManager.from_env(clock=clock) as manager:
            await manager.put(KEY, fake.issue(expires_in=0))
            await manager.get(KEY)

        assert 1 == fake.refresh_count


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch, fake: FakeProvider, tmp_path: Path) -> None:
    """The variables of a memory store, a key ring, the fake provider and a journal."""
    monkeypatch.setenv("CREDKEEPER_STORE", "memory://")
    monkeypatch.setenv("CREDKEEPER_KEYS", KEY_TEXT)
    monkeypatch.setenv("CREDKEEPER_PROVIDER", fake.token_url)
    monkeypatch.setenv("CREDKEEPER_JOURNAL", str(tmp_path / "journal"))


class ClosingStore(MemoryStore):
    """A memory store that remembers being closed."""

    closed = False

    def close(self) -> None:
        """Remember the call."""
        self.closed = True
        super().close()


def described(provider: Provider) -> dict[str, object]:
    """What a provider sends where: its name, URL, body, client and timeout."""
    return {
        "name": provider.name,
        "token_url": provider.token_url,
        "body_format": provider.body_format,
        "client_id": provider.client_id,
        "scope": provider.scope,
        "auth_method": provider.auth_method,
        "timeout": provider.timeout,
    }


CLAUDE_CODE = described(Provider.claude_code())
RFC6749 = {
    "name": "auth.example.com",
    "token_url": TOKEN_URL,
    "body_format": "form",
    "client_id": None,
    "scope": None,
    "auth_method": "none",
    "timeout": 15.0,
}


class TestProviderProfiles:
    def test_claude_code(self) -> None:
        """claude-code is Claude Code's endpoint: JSON body, its client id and scope."""
        assert {
            "name": "claude-code",
            "token_url": CLAUDE_CODE_TOKEN_URL,
            "body_format": "json",
            "client_id": CLAUDE_CODE_CLIENT_ID,
            "scope": CLAUDE_CODE_SCOPE,
            "auth_method": "none",
            "timeout": 15.0,
        } == described(Provider.from_setting("claude-code"))

    def test_wrapper_guide(self) -> None:
        """wrapper-guide is the guide's endpoint: JSON body, no client id."""
        expected = {
            **RFC6749,
            "name": "wrapper-guide",
            "token_url": WRAPPER_GUIDE_TOKEN_URL,
            "body_format": "json",
        }

        assert expected == described(Provider.from_setting("wrapper-guide"))

    def test_a_bare_url_is_claude_codes_protocol_there(self) -> None:
        """A bare token URL keeps its meaning: the Claude Code profile at that URL."""
        expected = {**CLAUDE_CODE, "token_url": TOKEN_URL}

        assert expected == described(Provider.from_setting(TOKEN_URL))

    def test_a_profile_at_another_url_with_its_options(self) -> None:
        """PROFILE+URL puts a profile at a staging endpoint, with its options."""
        staging = "https://staging.example.com/v1/oauth/token"
        expected = {**CLAUDE_CODE, "token_url": staging, "scope": "user:inference", "timeout": 5.0}

        assert expected == described(
            Provider.from_setting(f"claude-code+{staging}?scope=user:inference&timeout=5")
        )

    def test_oauth2_is_an_rfc6749_endpoint(self) -> None:
        """oauth2+URL: a form body, no client id, no scope, no client authentication."""
        assert RFC6749 == described(Provider.from_setting(f"oauth2+{TOKEN_URL}"))

    def test_oauth2_takes_its_client_id_and_scope(self) -> None:
        """client_id and scope in the query are sent; '+' in the scope is a space."""
        expected = {**RFC6749, "client_id": "my-app", "scope": "read write"}

        assert expected == described(
            Provider.from_setting(f"oauth2+{TOKEN_URL}?client_id=my-app&scope=read+write")
        )

    def test_oauth2_with_every_option(self) -> None:
        """auth_method, body_format and timeout are oauth2's options too."""
        query = "client_id=my-app&auth_method=client_secret_post&body_format=json&timeout=2.5"
        expected = {
            **RFC6749,
            "client_id": "my-app",
            "auth_method": "client_secret_post",
            "body_format": "json",
            "timeout": 2.5,
        }

        assert expected == described(
            Provider.from_setting(f"oauth2+{TOKEN_URL}?{query}", client_secret=CLIENT_SECRET)
        )

    def test_a_client_secret_authenticates_with_basic_by_default(self) -> None:
        """A client secret without auth_method is sent as HTTP Basic, RFC 6749's default."""
        provider = Provider.from_setting(
            f"oauth2+{TOKEN_URL}?client_id=my-app", client_secret=Secret(CLIENT_SECRET)
        )

        assert "client_secret_basic" == provider.auth_method

    def test_profile_names_ignore_case(self) -> None:
        """OAuth2+URL is oauth2+URL, as URL schemes ignore case."""
        assert RFC6749 == described(Provider.from_setting(f"OAuth2+{TOKEN_URL}"))


class TestProviderSettingErrors:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (
                "github",
                f"provider must be claude-code, wrapper-guide, or PROFILE+URL such as {EXAMPLE} "
                "(PROFILE: claude-code, wrapper-guide, oauth2), or a token URL spoken to with "
                "Claude Code's protocol; got 'github'",
            ),
            (
                f"github+{TOKEN_URL}",
                f"provider must be claude-code, wrapper-guide, or PROFILE+URL such as {EXAMPLE} "
                "(PROFILE: claude-code, wrapper-guide, oauth2), or a token URL spoken to with "
                "Claude Code's protocol; got 'github'",
            ),
            ("oauth2", f"provider: oauth2 needs the endpoint's token URL, as {EXAMPLE}"),
            (
                f"oauth2+{TOKEN_URL}?client_ld=app",
                "provider: the oauth2 profile takes no option 'client_ld'; its options are "
                "client_id, scope, auth_method, body_format, timeout",
            ),
            (
                f"wrapper-guide+{TOKEN_URL}?client_id=app",
                "provider: the wrapper-guide profile takes no option 'client_id'; its options "
                "are timeout",
            ),
            (
                f"oauth2+{TOKEN_URL}?scope=a&scope=b",
                "provider: the option 'scope' is given twice",
            ),
            (f"oauth2+{TOKEN_URL}?client_id=", "provider: the option 'client_id' needs a value"),
            (
                f"oauth2+{TOKEN_URL}?client_id",
                "provider: the URL's query must be NAME=VALUE pairs joined by '&'",
            ),
            (
                f"claude-code+{TOKEN_URL}?timeout=soon",
                "provider: timeout must be a positive number of seconds, such as 15, got 'soon'",
            ),
            (
                f"oauth2+{TOKEN_URL}?timeout=0",
                "provider: timeout must be a positive number of seconds, such as 15, got '0'",
            ),
            (
                f"oauth2+{TOKEN_URL}?body_format=xml",
                "provider: body_format must be 'form' or 'json', got 'xml'",
            ),
            (
                f"oauth2+{TOKEN_URL}?auth_method=client_secret_post",
                "provider: auth_method=client_secret_post sends a client secret; set it in "
                "client_secret",
            ),
            (
                f"oauth2+{TOKEN_URL}?auth_method=client_secret_jwt",
                "provider: auth_method must be 'none', 'client_secret_post' or "
                "'client_secret_basic', got 'client_secret_jwt'",
            ),
            (
                "oauth2+http://auth.example.com/token",
                "provider must use https (plain http is accepted only on loopback), "
                "got 'http://auth.example.com/token'",
            ),
        ],
    )
    def test_each_mistake_names_the_setting_and_the_fix(self, value: str, expected: str) -> None:
        """Every way a provider setting can be wrong is one message naming it and the fix."""
        with pytest.raises(ConfigurationError) as caught:
            Provider.from_setting(value)

        assert expected == str(caught.value)

    def test_messages_name_the_option_given(self) -> None:
        """The option's name given by the caller (the command line's) starts the message."""
        with pytest.raises(ConfigurationError, match=r"^--provider \(CREDKEEPER_PROVIDER\): "):
            Provider.from_setting("oauth2", option=PROVIDER)

    @pytest.mark.parametrize(
        ("value", "secret", "expected"),
        [
            (
                "claude-code",
                CLIENT_SECRET,
                f"{SECRET_VARIABLE} is set, but the claude-code profile sends no client secret; "
                f"unset it, or name an RFC 6749 endpoint in {PROVIDER} as {EXAMPLE}",
            ),
            (
                f"oauth2+{TOKEN_URL}",
                CLIENT_SECRET,
                f"{SECRET_VARIABLE} is set, but {PROVIDER} names no client id for it; add "
                "?client_id=ID to the token URL",
            ),
            (
                f"oauth2+{TOKEN_URL}?client_id=app&client_secret={CLIENT_SECRET}",
                None,
                f"{PROVIDER} must not hold the client secret, as it gets printed; give it in "
                f"{SECRET_VARIABLE}",
            ),
            (
                f"oauth2+https://app:{CLIENT_SECRET}@auth.example.com/token",
                None,
                f"{PROVIDER} must not hold a user or password, as it gets printed; give an "
                f"oauth2 endpoint's client id as ?client_id=ID and its secret in {SECRET_VARIABLE}",
            ),
        ],
    )
    def test_each_secret_mistake_names_its_variable_and_not_the_secret(
        self, value: str, secret: str | None, expected: str
    ) -> None:
        """A client secret misplaced or misused is refused, naming its variable, never quoted."""
        with pytest.raises(ConfigurationError) as caught:
            Provider.from_setting(
                value, client_secret=secret, option=PROVIDER, secret_option=SECRET_VARIABLE
            )

        assert expected == str(caught.value)

    def test_no_secret_in_the_providers_repr(self) -> None:
        """The provider a setting makes shows no client secret."""
        provider = Provider.from_setting(
            f"oauth2+{TOKEN_URL}?client_id=app", client_secret=CLIENT_SECRET
        )

        assert CLIENT_SECRET not in repr(provider)


class TestProviderSettingOverHttp:
    def test_an_rfc6749_endpoint_gets_a_form_body_and_its_client_id(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """oauth2+URL refreshes with a form body, the client id and scope it names."""
        with FakeProvider(clock=clock, client_id="my-app") as fake:
            provider = f"oauth2+{fake.token_url}?client_id=my-app&scope=read+write"
            with settings(tmp_path, provider).manager(clock=clock) as manager:
                manager.put(KEY, fake.issue(expires_in=0))
                manager.get(KEY)

            call = fake.refresh_calls[-1]
            assert ("ok", "form", "my-app", "read write", "none") == (
                call.outcome,
                call.body_format,
                call.client_id,
                call.scope,
                call.client_auth,
            )

    def test_the_client_secret_variable_authenticates_the_client(
        self, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The secret from CREDKEEPER_PROVIDER_CLIENT_SECRET authenticates with HTTP Basic."""
        environ = {
            "CREDKEEPER_STORE": "memory://",
            "CREDKEEPER_KEYS": KEY_TEXT,
            "CREDKEEPER_JOURNAL": str(tmp_path / "journal"),
            SECRET_VARIABLE: CLIENT_SECRET,
        }
        with FakeProvider(clock=clock, client_id="my-app", client_secret=CLIENT_SECRET) as fake:
            environ["CREDKEEPER_PROVIDER"] = f"oauth2+{fake.token_url}?client_id=my-app"
            with Settings.from_env(environ).manager(clock=clock) as manager:
                manager.put(KEY, fake.issue(expires_in=0))
                manager.get(KEY)

            call = fake.refresh_calls[-1]
            assert ("ok", "client_secret_basic") == (call.outcome, call.client_auth)
