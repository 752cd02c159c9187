"""credkeeper: rotating OAuth credentials kept fresh for many users, refreshed once per expiry."""

from __future__ import annotations

from ._clock import Clock, SystemClock
from ._credentials import Credentials
from ._exceptions import (
    ConfigurationError,
    ConflictError,
    CredentialNotFound,
    CredentialsError,
    CredkeeperError,
    DecryptionError,
    InvalidGrant,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    UnknownSchemeError,
)
from ._journal import RescueJournal
from ._keyring import KeyRing
from ._manager import AsyncTokenManager, TokenManager
from ._memory import MemoryStore
from ._provider import Provider
from ._record import Record, Status
from ._registry import open_store
from ._rekey import RekeyReport, rekey
from ._secret import Secret
from ._store import AsyncCredentialStore, CredentialStore, ThreadOffloadStore, as_async_store

__version__ = "0.1.0"

__all__ = [
    "AsyncCredentialStore",
    "AsyncTokenManager",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "CredentialNotFound",
    "CredentialStore",
    "Credentials",
    "CredentialsError",
    "CredkeeperError",
    "DecryptionError",
    "InvalidGrant",
    "KeyRing",
    "MemoryStore",
    "Provider",
    "ProviderError",
    "ProviderUnavailable",
    "ReauthRequired",
    "Record",
    "RefreshTimeout",
    "RekeyReport",
    "RescueJournal",
    "Secret",
    "Status",
    "StoreCorrupted",
    "StoreError",
    "StoreUnavailable",
    "SystemClock",
    "ThreadOffloadStore",
    "TokenManager",
    "UnknownSchemeError",
    "__version__",
    "as_async_store",
    "open_store",
    "rekey",
]
