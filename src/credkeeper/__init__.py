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
from ._memory import MemoryStore
from ._record import Record, Status
from ._registry import open_store
from ._secret import Secret
from ._store import AsyncCredentialStore, CredentialStore, ThreadOffloadStore, as_async_store

__version__ = "0.1.0"

__all__ = [
    "AsyncCredentialStore",
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
    "MemoryStore",
    "ProviderError",
    "ProviderUnavailable",
    "ReauthRequired",
    "Record",
    "RefreshTimeout",
    "Secret",
    "Status",
    "StoreCorrupted",
    "StoreError",
    "StoreUnavailable",
    "SystemClock",
    "ThreadOffloadStore",
    "UnknownSchemeError",
    "__version__",
    "as_async_store",
    "open_store",
]
