"""The HTTP service, ``credkeeper serve``: FastAPI on uvicorn, from the ``server`` extra.

The API key and webhook names below need no extra: the command line manages key files with
them, and a receiver verifies webhooks with them, so this module must not import FastAPI when
it is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._apikeys import ApiKey, ApiKeys, create_api_key, list_api_keys, revoke_api_key
from ._webhooks import (
    Webhooks,
    WebhookVerificationError,
    new_webhook_secret,
    sign_webhook,
    verify_webhook,
)

if TYPE_CHECKING:
    from ._app import create_app

__all__ = [
    "ApiKey",
    "ApiKeys",
    "WebhookVerificationError",
    "Webhooks",
    "create_api_key",
    "create_app",
    "list_api_keys",
    "new_webhook_secret",
    "revoke_api_key",
    "sign_webhook",
    "verify_webhook",
]


def __getattr__(name: str) -> Any:
    # FastAPI is imported only by whoever asks for the application.
    if name == "create_app":
        from ._app import create_app  # noqa: PLC0415

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
