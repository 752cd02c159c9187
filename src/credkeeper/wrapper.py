"""The Claude Wrapper API client: every name a call takes, returns or raises.

``credkeeper`` itself exports the two clients and the exception tree; this module adds what you
meet once a call is made, each under one name. With ``tokens`` a ``credkeeper.TokenManager``::

    from credkeeper.wrapper import ResultEvent, WrapperClient

    with WrapperClient(tokens) as client:
        history = [{"role": "user", "content": "Hi"}]
        print(client.messages.create("alice", history, model="opus").text)
        with client.messages.stream("alice", history) as stream:
            for event in stream:
                if isinstance(event, ResultEvent):
                    print(event.total_cost_usd)

Clients
    :class:`WrapperClient` (with a ``TokenManager``) and :class:`AsyncWrapperClient` (with an
    ``AsyncTokenManager``). ``client.messages`` is a :class:`Messages` or :class:`AsyncMessages`,
    whose ``create`` and ``stream`` take the keywords of :class:`RequestOptions`. ``stream``
    returns a :class:`MessageStream` or :class:`AsyncMessageStream`. Close a client with
    ``close()`` or ``await aclose()``, or use it in a ``with`` or ``async with`` block.

Replies
    :class:`Message` (``text``, ``content`` as :class:`ContentBlock` values, ``usage``,
    ``files`` as :class:`WorkspaceFile` values); :class:`Health` from ``client.health()``.

Stream events
    :class:`Event` and its subclasses :class:`SystemEvent`, :class:`StreamEvent`,
    :class:`AssistantEvent`, :class:`FileEvent`, :class:`FilesBatchEvent` and
    :class:`ResultEvent`, which ends every stream.

Errors
    :class:`WrapperError` and its subclasses, the same classes as ``credkeeper``'s:
    :class:`InvalidRequest` (its ``errors`` are :class:`FieldViolation` values),
    :class:`AuthFailed`, :class:`UsageLimitReached`, :class:`WrapperCLIError`,
    :class:`UnsafeFilePath` and :class:`WrapperUnavailable`.
"""

from __future__ import annotations

from ._exceptions import (
    AuthFailed,
    FieldViolation,
    InvalidRequest,
    UnsafeFilePath,
    UsageLimitReached,
    WrapperCLIError,
    WrapperError,
    WrapperUnavailable,
)
from ._messages import (
    AssistantEvent,
    ContentBlock,
    Event,
    FileEvent,
    FilesBatchEvent,
    Health,
    Message,
    RequestOptions,
    ResultEvent,
    StreamEvent,
    SystemEvent,
    WorkspaceFile,
)
from ._wrapper import (
    AsyncMessages,
    AsyncMessageStream,
    AsyncWrapperClient,
    Messages,
    MessageStream,
    WrapperClient,
)

__all__ = [
    "AssistantEvent",
    "AsyncMessageStream",
    "AsyncMessages",
    "AsyncWrapperClient",
    "AuthFailed",
    "ContentBlock",
    "Event",
    "FieldViolation",
    "FileEvent",
    "FilesBatchEvent",
    "Health",
    "InvalidRequest",
    "Message",
    "MessageStream",
    "Messages",
    "RequestOptions",
    "ResultEvent",
    "StreamEvent",
    "SystemEvent",
    "UnsafeFilePath",
    "UsageLimitReached",
    "WorkspaceFile",
    "WrapperCLIError",
    "WrapperClient",
    "WrapperError",
    "WrapperUnavailable",
]
