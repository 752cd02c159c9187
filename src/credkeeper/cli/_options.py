"""The ``credkeeper`` command's global options: the run's settings, and what they opened.

A command receives a :class:`GlobalOptions` through ``@pass_options`` and asks it for what it needs
(``options.store()``, ``options.keyring()``, ``options.token_codec()``, ``options.manager()``);
everything is opened on first use, from the run's :class:`~credkeeper.Settings`, and closed when
the command ends, so a command is one function and opens nothing it does not use (``status``
never needs the key ring, ``keygen`` never touches a store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click

from credkeeper._codec import TokenCodec
from credkeeper._exceptions import ConfigurationError
from credkeeper._keyring import KeyRing
from credkeeper._manager import TokenManager
from credkeeper._settings import Settings
from credkeeper._store import CredentialStore, is_async_store

__all__ = ["GlobalOptions", "pass_options"]


@dataclass(eq=False)
class GlobalOptions:
    """The settings of one ``credkeeper`` run, and the store and manager opened from them."""

    settings: Settings
    debug: bool
    _store: CredentialStore | None = field(default=None, init=False, repr=False)
    _manager: TokenManager | None = field(default=None, init=False, repr=False)

    @property
    def keys(self) -> str | None:
        """The ``--keys`` value, None when not given."""
        return self.settings.keys

    @property
    def codec(self) -> str | None:
        """The ``--codec`` value, None when not given."""
        return self.settings.codec

    @property
    def journal(self) -> Path | None:
        """The ``--journal`` directory, None for the default."""
        return self.settings.journal

    @property
    def wrapper_url(self) -> str:
        """The ``--wrapper-url`` value."""
        return self.settings.wrapper_url

    @property
    def store_display(self) -> str:
        """The store URL with any password hidden, for messages."""
        return self.settings.store_display

    def keyring(self) -> KeyRing:
        """The key ring from ``--keys``; a ConfigurationError naming the fix when there is none.

        Commands that write or read tokens always need one: the command line never writes
        tokens in clear, and a key ring it made up by itself could not be shared with the
        application that reads the same store.
        """
        return self.settings.load_keyring()

    def token_codec(self) -> TokenCodec | None:
        """The application's codec from ``--codec``, or None when the option is not given."""
        return self.settings.load_codec()

    def store(self) -> CredentialStore:
        """The store ``--store`` names, opened once and closed when the command ends."""
        if self._store is None:
            store = self.settings.open_store()
            if not isinstance(store, CredentialStore) or is_async_store(store):
                raise ConfigurationError(
                    f"the store {self.store_display} is asynchronous only; "
                    "the command line needs a store with a synchronous interface"
                )
            self._store = store
        return self._store

    def manager(self) -> TokenManager:
        """A :class:`TokenManager` on the store, as :meth:`Settings.manager` makes one.

        With ``--codec`` the application's codec seals the tokens, as the application's own
        manager does, so that it can read what the command line writes; a store declared
        plaintext (its ``plaintext`` option) keeps tokens as the application wrote them. Either
        way no key ring is needed; one given still seals the rescue journal.
        """
        if self._manager is None:
            self._manager = self.settings.manager(store=self.store())
        return self._manager

    def close(self) -> None:
        """Close what was opened; the manager closes its store too."""
        if self._manager is not None:
            self._manager.close()
        elif self._store is not None:
            self._store.close()
        self._manager = self._store = None


#: Hands the run's :class:`GlobalOptions` to a command: ``@pass_options def cmd(options, ...)``.
pass_options = click.make_pass_decorator(GlobalOptions)
