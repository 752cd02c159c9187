"""The ``credkeeper`` command's global options, and the store, key ring and manager they open.

A command receives a :class:`Settings` through ``@pass_settings`` and asks it for what it needs
(``settings.store()``, ``settings.keyring()``, ``settings.manager()``); everything is opened on
first use and closed when the command ends, so a command is one function and opens nothing
it does not use (``status`` never needs the key ring, ``keygen`` never touches a store).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click

from ._exceptions import ConfigurationError
from ._files import make_private_directories
from ._keyring import KeyRing
from ._manager import TokenManager
from ._provider import Provider
from ._registry import open_store
from ._store import CredentialStore, declares_plaintext

__all__ = [
    "DEFAULT_WRAPPER_URL",
    "PROVIDER_PROFILES",
    "Settings",
    "default_keys_path",
    "default_store_path",
    "display_url",
    "load_keyring",
    "pass_settings",
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
class Settings:
    """The global options of one ``credkeeper`` run, and the resources opened from them.

    ``store_url`` is already resolved (``default_store`` says whether it is the default);
    ``keys`` is the raw ``--keys`` value, read only when a command asks for the key ring.
    """

    store_url: str
    default_store: bool
    keys: str | None
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

        A store declared plaintext (its ``plaintext`` option) keeps tokens as the application
        wrote them, so it needs no key ring; one given still seals the rescue journal.
        """
        if self._manager is None:
            if self._plaintext_store():
                keyring = self.keyring() if self.keys and self.keys.strip() else None
            else:
                keyring = self.keyring()
            self._manager = TokenManager(
                self.store(), self.provider, keyring=keyring, journal=self.journal
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


#: Hands the run's :class:`Settings` to a command: ``@pass_settings def cmd(settings, ...)``.
pass_settings = click.make_pass_decorator(Settings)
