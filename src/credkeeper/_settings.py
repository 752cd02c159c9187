"""``Settings``: the one loader of the store, key ring, provider, journal and wrapper URL.

The command line, :meth:`TokenManager.from_env`, :meth:`AsyncTokenManager.from_env` and the
service all read the ``CREDKEEPER_*`` variables of :data:`ENVIRONMENT` through it, so a
deployment chooses its backend by configuration alone. A :class:`Settings` holds the raw
values, checked; its methods open what they name only when asked, so a program opens nothing
it does not use (``credkeeper status`` never reads the key ring).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._codec import TokenCodec
from ._exceptions import ConfigurationError, CredkeeperError
from ._files import make_private_directories
from ._keyring import KeyRing, key_file
from ._manager import AsyncTokenManager, TokenManager
from ._provider import Provider
from ._registry import open_store
from ._secret import Secret
from ._store import AsyncCredentialStore, CredentialStore, declares_plaintext, is_async_store
from ._wrapper import DEFAULT_WRAPPER_URL, WRAPPER_URL_VARIABLE

__all__ = [
    "ENVIRONMENT",
    "Settings",
    "default_keys_path",
    "default_store_path",
    "display_url",
    "label",
]

M = TypeVar("M", TokenManager, AsyncTokenManager)

#: Each setting's environment variable and command-line option; the one table of their names.
ENVIRONMENT: Mapping[str, tuple[str, str | None]] = MappingProxyType(
    {
        "store": ("CREDKEEPER_STORE", "--store"),
        "keys": ("CREDKEEPER_KEYS", "--keys"),
        "codec": ("CREDKEEPER_CODEC", "--codec"),
        "provider": ("CREDKEEPER_PROVIDER", "--provider"),
        # No option: a command line shows in `ps` and in shell history.
        "client_secret": ("CREDKEEPER_PROVIDER_CLIENT_SECRET", None),
        "journal": ("CREDKEEPER_JOURNAL", "--journal"),
        "wrapper_url": (WRAPPER_URL_VARIABLE, "--wrapper-url"),
    }
)


def label(name: str) -> str:
    """How messages name a setting: ``--keys (CREDKEEPER_KEYS)``, or the variable alone."""
    variable, option = ENVIRONMENT[name]
    return variable if option is None else f"{option} ({variable})"


def default_store_path() -> Path:
    """``$XDG_DATA_HOME/credkeeper/credentials.json``, else under ``~/.local/share``."""
    data = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(data) if os.path.isabs(data) else Path.home() / ".local" / "share"
    return base / "credkeeper" / "credentials.json"


def default_keys_path() -> Path:
    """Where the error for a missing key ring suggests writing one: the user's config dir.

    Not beside the store: a key kept next to the data it protects protects nothing from
    whoever copies the directory.
    """
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "credkeeper" / "keys"


# Query parameters whose value is a secret (libpq's password=, sslpassword=, a driver's token).
_SECRET_PARAMETER = re.compile(
    r"^(.*pass(word|wd)?|.*secret|(access_|auth_|session_)?token|api_?key)$", re.IGNORECASE
)


def display_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, in the authority or the query (libpq's
    ``?password=``, ``sslpassword=``), fit to print; a URL with none is returned as it is."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_PARAMETER.match(name) for name, _ in pairs)
    if password is None and not secret_query:
        # Unchanged, not rebuilt: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path.
        return url
    if password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if secret_query:
        masked = [(n, "***" if _SECRET_PARAMETER.match(n) else v) for n, v in pairs]
        parts = parts._replace(query=urlencode(masked, safe="*"))
    return urlunsplit(parts)


@dataclass(frozen=True, kw_only=True, repr=False)
class Settings:
    """Where a deployment keeps its credentials and whom it refreshes them with.

    - ``store``: a store URL, any that :func:`open_store` takes; None is the default, an
      encrypted file store at :func:`default_store_path` (its directory made with mode 0700).
    - ``keys``: the key ring sealing token fields: key text as ``credkeeper keygen`` prints
      it, or ``@PATH`` of a key file (so is one line without ``:`` containing ``/`` or
      starting with ``~`` or ``.``, since key text always has ``id:key`` entries).
    - ``codec``: ``MODULE:FACTORY``, the application's own cipher instead of the key ring.
    - ``provider``: the token endpoint, in the form :meth:`Provider.from_setting` reads
      (``claude-code``, ``wrapper-guide``, ``oauth2+https://...?client_id=ID``, a bare URL).
    - ``client_secret``: an ``oauth2`` provider's client secret; never part of ``provider``,
      which gets printed.
    - ``journal``: the rescue journal's directory; None is the manager's default.
    - ``wrapper_url``: the Claude Wrapper API's base URL.

    Blank ``store``, ``keys`` and ``codec`` count as unset. The provider is checked when the
    settings are made, so a mistake in it is reported at start-up; the rest is read when a
    method asks for it. ``repr`` shows no key text, secret or password.
    """

    store: str | None = None
    keys: str | None = None
    codec: str | None = None
    provider: str = "claude-code"
    client_secret: Secret | None = None
    journal: Path | None = None
    wrapper_url: str = DEFAULT_WRAPPER_URL

    def __post_init__(self) -> None:
        for name in ("store", "keys", "codec", "provider", "wrapper_url"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"{label(name)} must be a str, not {type(value).__name__}")
            if name in ("store", "keys", "codec") and value is not None and not value.strip():
                object.__setattr__(self, name, None)
        if self.journal is not None:
            if not isinstance(self.journal, str | os.PathLike):
                raise ConfigurationError(
                    f"{label('journal')} must be a directory path, "
                    f"not {type(self.journal).__name__}"
                )
            object.__setattr__(self, "journal", Path(self.journal).expanduser())
        if self.client_secret is not None:
            if not isinstance(self.client_secret, str | Secret):
                raise ConfigurationError(
                    f"{label('client_secret')} must be a str, "
                    f"not {type(self.client_secret).__name__}"
                )
            # An empty secret is no secret at all.
            object.__setattr__(self, "client_secret", Secret(self.client_secret) or None)
        self.load_provider()

    def __repr__(self) -> str:
        keys = self.keys if self.keys is None or key_file(self.keys) else "***"
        shown = {
            "store": self.store and display_url(self.store),
            "keys": keys,
            "codec": self.codec,
            "provider": self.provider,
            "client_secret": self.client_secret and "***",
            "journal": self.journal and str(self.journal),
            "wrapper_url": display_url(self.wrapper_url),
        }
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The settings the ``CREDKEEPER_*`` variables of ``environ`` (default ``os.environ``) give.

        Each keyword that is not None replaces its variable, as a command-line option does;
        an empty variable counts as unset. The names are :data:`ENVIRONMENT`'s.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {
            name: environ[variable]
            for name, (variable, _) in ENVIRONMENT.items()
            if environ.get(variable)
        }
        values.update((name, value) for name, value in overrides.items() if value is not None)
        return cls(**values)

    @property
    def store_url(self) -> str:
        """The store's URL: ``store``, or the default file store's ``file://`` URL."""
        return self.store or default_store_path().as_uri()

    @property
    def store_display(self) -> str:
        """:attr:`store_url` with any password hidden, for messages."""
        return display_url(self.store_url)

    def open_store(self) -> CredentialStore | AsyncCredentialStore:
        """The store :attr:`store_url` names, opened; whoever holds it closes it."""
        if self.store is None:
            # 0700: the directory holds every user's (sealed) refresh tokens.
            make_private_directories(default_store_path().parent)
        return open_store(self.store_url)

    def load_keyring(self) -> KeyRing:
        """The key ring ``keys`` names; a ConfigurationError naming the fix when there is none.

        A key ring made up on the spot could not be shared with the other programs that read
        the same store, so there is none by default.
        """
        if self.keys is None:
            variable, option = ENVIRONMENT["keys"]
            raise ConfigurationError(
                f"no key ring: run `credkeeper keygen --output {default_keys_path()}`, then set "
                f"{variable}=@{default_keys_path()} (or pass {option})"
            )
        path = key_file(self.keys)
        return KeyRing.parse(self.keys) if path is None else KeyRing.from_file(path)

    def load_codec(self) -> TokenCodec | None:
        """The application's codec ``codec`` names, or None when it names none.

        MODULE is imported from the running environment (installed, or on ``PYTHONPATH``),
        and FACTORY, an attribute of it (dotted for a nested one), is called with no
        arguments. Every failure is a ConfigurationError naming the setting, the value and the
        fix; errors raised by the application's code are named by type only, as their text
        could hold its secret.
        """
        if self.codec is None:
            return None
        return _load_codec(self.codec)

    def load_provider(self) -> Provider:
        """The :class:`Provider` ``provider`` names, with ``client_secret``."""
        return Provider.from_setting(
            self.provider,
            client_secret=self.client_secret,
            option=label("provider"),
            secret_option=label("client_secret"),
        )

    def manager(self, *, store: CredentialStore | None = None, **options: Any) -> TokenManager:
        """A :class:`TokenManager` on these settings' store, provider, sealing and journal.

        ``options`` (``leeway``, ``clock``, ...) go to its constructor. Token fields are sealed
        with the ``codec`` when it is set, kept as they are by a store declared plaintext, and
        sealed with the key ring otherwise, which is then required; a key ring given beside a
        codec or a plaintext store seals the rescue journal. ``store`` is an already opened
        store to use instead of opening :attr:`store_url`. The manager closes the store; when
        it cannot be made, a store opened here is closed again.
        """
        return self._open_manager(TokenManager, store, options)

    def async_manager(
        self,
        *,
        store: AsyncCredentialStore | CredentialStore | None = None,
        **options: Any,
    ) -> AsyncTokenManager:
        """An :class:`AsyncTokenManager` on these settings, as :meth:`manager` makes one."""
        return self._open_manager(AsyncTokenManager, store, options)

    def _open_manager(
        self,
        kind: Callable[..., M],
        store: AsyncCredentialStore | CredentialStore | None,
        options: Mapping[str, Any],
    ) -> M:
        opened = self.open_store() if store is None else store
        try:
            provider = self.load_provider()
            return kind(opened, provider, **self._sealing(opened), journal=self.journal, **options)
        except BaseException:
            # An asyncio store cannot be closed from here; the first-party ones connect on
            # first use, so one dropped before any use holds no connection.
            if store is None and not is_async_store(opened):
                cast(CredentialStore, opened).close()
            raise

    def _sealing(self, store: object) -> dict[str, Any]:
        """The ``codec`` and ``keyring`` arguments of a manager on ``store``."""
        plaintext = declares_plaintext(store)
        if self.codec is not None and plaintext:
            raise ConfigurationError(
                f"{label('codec')} {self.codec!r} is given, but the store {self.store_display} "
                "is declared plaintext (its plaintext option) and keeps tokens as they are; "
                f"drop {ENVIRONMENT['codec'][1]}, or drop the store's plaintext option to seal "
                "with the codec"
            )
        codec = self.load_codec()
        # With a codec or a plaintext store, a key ring seals only the rescue journal.
        wanted = self.keys is not None or (codec is None and not plaintext)
        return {"codec": codec, "keyring": self.load_keyring() if wanted else None}


def _load_codec(value: str) -> TokenCodec:
    setting = f"{label('codec')} {value!r}"
    module_name, colon, factory_name = value.strip().partition(":")
    if not colon or not module_name or not factory_name:
        raise ConfigurationError(
            f"{setting} must be MODULE:FACTORY, such as myapp.tokens:make_codec: FACTORY() "
            "must return the application's credkeeper.TokenCodec"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"{setting}: cannot import {module_name!r} (no module named {exc.name!r}); "
            "install what is missing in credkeeper's environment, or add the directory "
            "holding it to PYTHONPATH"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(
            f"{setting}: importing {module_name!r} raised {_reason(exc)}; fix the module "
            "(rerun with --debug for the traceback)"
        ) from exc
    for name in factory_name.split("."):
        if not hasattr(target, name):
            raise ConfigurationError(
                f"{setting}: {module_name!r} has no attribute {factory_name!r}; name a function "
                "or class of that module that builds the codec with no arguments"
            )
        target = getattr(target, name)
    if not callable(target):
        raise ConfigurationError(
            f"{setting}: {factory_name} is a {type(target).__name__}, not something to call; "
            "name a function or class that builds the codec with no arguments"
        )
    try:
        codec = target()
    except Exception as exc:
        raise ConfigurationError(
            f"{setting}: {factory_name}() raised {_reason(exc)}; it must build the codec with no "
            "arguments, reading its secret from the environment, say (rerun with --debug for "
            "the traceback)"
        ) from exc
    if not (isinstance(codec, TokenCodec) and callable(codec.seal) and callable(codec.unseal)):
        raise ConfigurationError(
            f"{setting}: {factory_name}() returned a {type(codec).__name__}, not a codec; it must "
            "return an object with seal(value, *, key, field) and unseal(value, *, key, field) "
            "methods (credkeeper.TokenCodec)"
        )
    return codec


def _reason(exc: Exception) -> str:
    # credkeeper's own messages hold no secret; anything else is named by its type alone.
    if isinstance(exc, CredkeeperError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__
