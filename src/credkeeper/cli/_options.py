"""The ``credkeeper`` command's global options, and the store, key ring and manager they open.

A command receives a :class:`GlobalOptions` through ``@pass_options`` and asks it for what it needs
(``options.store()``, ``options.keyring()``, ``options.token_codec()``, ``options.manager()``);
everything is opened on first use and closed when the command ends, so a command is one
function and opens nothing it does not use (``status`` never needs the key ring, ``keygen``
never touches a store).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from credkeeper._codec import TokenCodec
from credkeeper._exceptions import ConfigurationError, CredkeeperError
from credkeeper._files import make_private_directories
from credkeeper._keyring import KeyRing
from credkeeper._manager import TokenManager
from credkeeper._provider import Provider
from credkeeper._registry import open_store
from credkeeper._store import CredentialStore, declares_plaintext

__all__ = [
    "DEFAULT_WRAPPER_URL",
    "PROVIDER_PROFILES",
    "GlobalOptions",
    "default_keys_path",
    "default_store_path",
    "display_url",
    "load_codec",
    "load_keyring",
    "pass_options",
    "resolve_provider",
]

DEFAULT_WRAPPER_URL = "https://wrapper.claude.serenity-system.fr"

#: ``--provider`` names and the profiles they select; any other value must be a token URL.
PROVIDER_PROFILES = {
    "claude-code": Provider.claude_code,
    "wrapper-guide": Provider.wrapper_guide,
}


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


def load_keyring(value: str) -> KeyRing:
    """The key ring a ``--keys`` / ``CREDKEEPER_KEYS`` value names.

    ``@PATH`` is a key file; so is a value that contains ``/`` or starts with ``~`` or ``.``,
    since key text never does (ids and base64url use neither). Anything else is key text in
    the ``id:base64url-key`` form ``credkeeper keygen`` prints.
    """
    if value.startswith("@"):
        return KeyRing.from_file(Path(value[1:]).expanduser())
    if "/" in value or os.sep in value or value.startswith(("~", ".")):
        return KeyRing.from_file(Path(value).expanduser())
    return KeyRing.parse(value)


def load_codec(value: str) -> TokenCodec:
    """The codec a ``--codec`` / ``CREDKEEPER_CODEC`` value names: ``MODULE:FACTORY``.

    MODULE is imported from credkeeper's environment (installed there, or on ``PYTHONPATH``;
    the command line adds no directory to the import path), and FACTORY, an attribute of it
    (dotted for a nested one), is called with no arguments.
    Every failure is a ConfigurationError naming the option, the value and the fix. Errors
    raised by the application's code are named by type only, as their text could hold its
    secret; ``--debug`` shows them whole.
    """
    option = f"--codec (CREDKEEPER_CODEC) {value!r}"
    module_name, colon, factory_name = value.strip().partition(":")
    if not colon or not module_name or not factory_name:
        raise ConfigurationError(
            f"{option} must be MODULE:FACTORY, such as myapp.tokens:make_codec: FACTORY() "
            "must return the application's credkeeper.TokenCodec"
        )
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"{option}: cannot import {module_name!r} (no module named {exc.name!r}); "
            "install what is missing in credkeeper's environment, or add the directory "
            "holding it to PYTHONPATH"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(
            f"{option}: importing {module_name!r} raised {_reason(exc)}; fix the module "
            "(rerun with --debug for the traceback)"
        ) from exc
    for name in factory_name.split("."):
        if not hasattr(target, name):
            raise ConfigurationError(
                f"{option}: {module_name!r} has no attribute {factory_name!r}; name a function "
                "or class of that module that builds the codec with no arguments"
            )
        target = getattr(target, name)
    if not callable(target):
        raise ConfigurationError(
            f"{option}: {factory_name} is a {type(target).__name__}, not something to call; "
            "name a function or class that builds the codec with no arguments"
        )
    try:
        codec = target()
    except Exception as exc:
        raise ConfigurationError(
            f"{option}: {factory_name}() raised {_reason(exc)}; it must build the codec with no "
            "arguments, reading its secret from the environment, say (rerun with --debug for "
            "the traceback)"
        ) from exc
    if not (isinstance(codec, TokenCodec) and callable(codec.seal) and callable(codec.unseal)):
        raise ConfigurationError(
            f"{option}: {factory_name}() returned a {type(codec).__name__}, not a codec; it must "
            "return an object with seal(value, *, key, field) and unseal(value, *, key, field) "
            "methods (credkeeper.TokenCodec)"
        )
    return codec


def _reason(exc: Exception) -> str:
    # credkeeper's own messages hold no secret; anything else is named by its type alone.
    if isinstance(exc, CredkeeperError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def resolve_provider(value: str) -> Provider:
    """The provider a ``--provider`` value names: a profile name, or a token URL.

    A URL gets the Claude Code profile (JSON body, Claude Code's client id) at that address,
    which is what a self-hosted or test endpoint speaking Claude Code's protocol expects.
    """
    profile = PROVIDER_PROFILES.get(value)
    if profile is not None:
        return profile()
    if "://" in value:
        return Provider.claude_code(token_url=value)
    raise ConfigurationError(
        f"--provider must be {' or '.join(PROVIDER_PROFILES)}, or a token URL "
        f"such as https://example.com/oauth/token; got {value!r}"
    )


def display_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit to print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@dataclass(eq=False)
class GlobalOptions:
    """The global options of one ``credkeeper`` run, and the resources opened from them.

    ``store_url`` is already resolved (``default_store`` says whether it is the default);
    ``keys`` and ``codec`` are the raw ``--keys`` and ``--codec`` values, read only when a
    command asks for the key ring or the codec.
    """

    store_url: str
    default_store: bool
    keys: str | None
    codec: str | None
    provider: Provider
    wrapper_url: str
    journal: Path | None
    debug: bool
    _store: CredentialStore | None = field(default=None, init=False, repr=False)
    _manager: TokenManager | None = field(default=None, init=False, repr=False)

    @property
    def store_display(self) -> str:
        """The store URL with any password hidden, for messages."""
        return display_url(self.store_url)

    def keyring(self) -> KeyRing:
        """The key ring from ``--keys``; a ConfigurationError naming the fix when there is none.

        Commands that write or read tokens always need one: the command line never writes
        tokens in clear, and a key ring it made up by itself could not be shared with the
        application that reads the same store.
        """
        if not self.keys or not self.keys.strip():
            raise ConfigurationError(
                "no key ring: run `credkeeper keygen --output "
                f"{default_keys_path()}`, then set CREDKEEPER_KEYS=@{default_keys_path()} "
                "(or pass --keys)"
            )
        return load_keyring(self.keys)

    def token_codec(self) -> TokenCodec | None:
        """The application's codec from ``--codec``, or None when the option is not given."""
        if not self.codec or not self.codec.strip():
            return None
        return load_codec(self.codec)

    def store(self) -> CredentialStore:
        """The store ``--store`` names, opened once and closed when the command ends."""
        if self._store is None:
            if self.default_store:
                # 0700: the directory holds every user's (sealed) refresh tokens.
                make_private_directories(default_store_path().parent)
            store = open_store(self.store_url)
            if not isinstance(store, CredentialStore) or asyncio.iscoroutinefunction(
                getattr(store, "get", None)
            ):
                raise ConfigurationError(
                    f"the store {self.store_display} is asynchronous only; "
                    "the command line needs a store with a synchronous interface"
                )
            self._store = store
        return self._store

    def manager(self) -> TokenManager:
        """A :class:`TokenManager` on the store, the provider, the key ring and ``--journal``.

        With ``--codec`` the application's codec seals the tokens, as the application's own
        manager does, so that it can read what the command line writes; a store declared
        plaintext (its ``plaintext`` option) keeps tokens as the application wrote them. Either
        way no key ring is needed; one given still seals the rescue journal.
        """
        if self._manager is None:
            if self.codec and self.codec.strip() and self._plaintext_store():
                raise ConfigurationError(
                    f"--codec (CREDKEEPER_CODEC) {self.codec!r} is given, but the store "
                    f"{self.store_display} is declared plaintext (its plaintext option) and "
                    "keeps tokens as they are; drop --codec, or drop the store's plaintext "
                    "option to seal with the codec"
                )
            codec = self.token_codec()
            if codec is not None or self._plaintext_store():
                keyring = self.keyring() if self.keys and self.keys.strip() else None
            else:
                keyring = self.keyring()
            self._manager = TokenManager(
                self.store(), self.provider, keyring=keyring, journal=self.journal, codec=codec
            )
        return self._manager

    def _plaintext_store(self) -> bool:
        return declares_plaintext(self.store())

    def close(self) -> None:
        """Close what was opened; the manager closes its store too."""
        if self._manager is not None:
            self._manager.close()
        elif self._store is not None:
            self._store.close()
        self._manager = self._store = None


#: Hands the run's :class:`GlobalOptions` to a command: ``@pass_options def cmd(options, ...)``.
pass_options = click.make_pass_decorator(GlobalOptions)
