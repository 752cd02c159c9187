"""credkeeper: rotating OAuth credentials kept fresh for many users, refreshed once per expiry."""

from __future__ import annotations

from ._budget import time_remaining
from ._clock import Clock, SystemClock
from ._codec import TokenCodec
from ._credentials import Credentials
from ._events import EventHook, EventKind, RefreshEvent
from ._exceptions import (
    AuthFailed,
    ConfigurationError,
    ConflictError,
    CredentialNotFound,
    CredentialsError,
    CredkeeperError,
    DecryptionError,
    InvalidGrant,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    ReauthRequired,
    RefreshTimeout,
    StoreContention,
    StoreCorrupted,
    StoreError,
    StoreUnavailable,
    UnknownSchemeError,
    UnsafeFilePath,
    UsageLimitReached,
    WrapperCLIError,
    WrapperError,
    WrapperUnavailable,
)
from ._journal import RescueJournal
from ._keyring import KeyRing
from ._manager import AsyncTokenManager, TokenManager
from ._memory import MemoryStore
from ._migrate import MigrateReport, migrate
from ._provider import Provider
from ._record import Record, Status
from ._registry import open_store
from ._rekey import RekeyReport, rekey
from ._secret import Secret
from ._settings import Settings
from ._store import AsyncCredentialStore, CredentialStore, as_async_store
from ._sweeper import AsyncSweeper, Sweeper, SweepReport
from ._wrapper import AsyncWrapperClient, WrapperClient

__version__ = "0.1.0"

__all__ = [
    "AsyncCredentialStore",
    "AsyncSweeper",
    "AsyncTokenManager",
    "AsyncWrapperClient",
    "AuthFailed",
    "Clock",
    "ConfigurationError",
    "ConflictError",
    "CredentialNotFound",
    "CredentialStore",
    "Credentials",
    "CredentialsError",
    "CredkeeperError",
    "DecryptionError",
    "EventHook",
    "EventKind",
    "InvalidGrant",
    "InvalidRequest",
    "KeyRing",
    "MemoryStore",
    "MigrateReport",
    "Provider",
    "ProviderError",
    "ProviderUnavailable",
    "ReauthRequired",
    "Record",
    "RefreshEvent",
    "RefreshTimeout",
    "RekeyReport",
    "RescueJournal",
    "Secret",
    "Settings",
    "Status",
    "StoreContention",
    "StoreCorrupted",
    "StoreError",
    "StoreUnavailable",
    "SweepReport",
    "Sweeper",
    "SystemClock",
    "TokenCodec",
    "TokenManager",
    "UnknownSchemeError",
    "UnsafeFilePath",
    "UsageLimitReached",
    "WrapperCLIError",
    "WrapperClient",
    "WrapperError",
    "WrapperUnavailable",
    "__version__",
    "as_async_store",
    "migrate",
    "open_store",
    "rekey",
    "time_remaining",
]
