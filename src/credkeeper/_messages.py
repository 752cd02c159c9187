"""What goes to the Claude Wrapper API and what comes back, as typed values; no I/O.

The request side mirrors the wrapper's own validation (its pydantic models, see
``wrapper-and-provider.md`` section 1.3), so a request the wrapper would refuse with HTTP 422 is
refused here first, with every offending field named. The response side parses the wrapper's
real shapes: the non-streaming envelope (or the raw JSON value it returns when the model's reply
is itself JSON), Claude Code ``stream-json`` objects as NDJSON lines or SSE ``data:`` lines, and
the error bodies it answers with.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Literal, TypedDict

import httpx

from ._exceptions import FieldViolation, InvalidRequest, UnsafeFilePath, WrapperError
from ._redact import Redactor

__all__ = [
    "AssistantEvent",
    "ContentBlock",
    "Event",
    "FileEvent",
    "FilesBatchEvent",
    "Health",
    "Message",
    "RequestOptions",
    "ResultEvent",
    "StreamEvent",
    "SystemEvent",
    "WorkspaceFile",
]

DEFAULT_MODEL = "sonnet"
# For isinstance: the builtin type answers at once for what JSON decoding and most callers
# give, where the ABC alone goes through ABCMeta's Python-level hook; these checks run on
# every request, for every message.
MAPPING = (dict, Mapping)
SEQUENCE = (list, tuple, Sequence)
ROLES = frozenset({"user", "assistant"})
TRANSPORTS = frozenset({"sse", "streamableHttp"})
AUTH_TYPES = frozenset({"jwt", "oauth", "bearer"})
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


def _frozen(value: object) -> Mapping[str, Any]:
    return MappingProxyType(dict(value)) if isinstance(value, MAPPING) else _EMPTY


# -- request -----------------------------------------------------------------------------


class RequestOptions(TypedDict, total=False):
    """The options of a request: the keywords of ``messages.create`` and ``messages.stream``.

    Defined once for both methods and both clients. Each may be left out:

    - ``model`` (default ``"sonnet"``): ``opus``, ``sonnet``, ``haiku`` or a full model id.
    - ``fallback_model`` (default ``None``): the same, for when the model is overloaded.
    - ``session_id`` (default ``None``): passed on, though the wrapper resumes no session.
    - ``thinking`` (default ``None``, the wrapper's choice): ``True`` or ``False`` turns extended
      thinking on or off.
    - ``include_files`` (default ``False``): return the CLI's workspace files in
      :attr:`Message.files`.
    - ``mcp_servers`` (default ``None``): server names mapped to ``{"command": ...}`` or
      ``{"url": ..., "transport": "sse" | "streamableHttp"}``.
    - ``timeout`` (default ``None``, the client's own): seconds or an ``httpx.Timeout`` for this
      call.
    """

    model: str
    session_id: str | None
    thinking: bool | None
    fallback_model: str | None
    include_files: bool
    mcp_servers: Mapping[str, Mapping[str, Any]] | None
    timeout: float | httpx.Timeout | None


OPTIONS = RequestOptions.__optional_keys__


def build_body(messages: Sequence[Mapping[str, Any]], options: RequestOptions) -> dict[str, Any]:
    """The request body without ``oauth_credentials``; :class:`InvalidRequest` lists every fault.

    ``options`` holds what the caller gave; one left out takes its default. ``timeout`` is the
    client's business, not the body's. A name that is no option is a ``TypeError``, as it was
    when each method listed its keywords.
    """
    problems = _check_messages(messages)
    # Most calls give no option: defaults need neither checking nor sending.
    if options:
        problems += _check_options(options)
    if problems:
        raise InvalidRequest(problems)
    body: dict[str, Any] = {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "model": options.get("model", DEFAULT_MODEL),
    }
    if options:
        body.update(_sent_options(options))
    return body


def _check_options(options: RequestOptions) -> list[FieldViolation]:
    """The faults of the options given, in a fixed order whatever the caller's."""
    unknown = options.keys() - OPTIONS
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {min(unknown)!r}; "
            f"the request options are {', '.join(sorted(OPTIONS))}"
        )
    problems = []
    model = options.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        problems.append(
            FieldViolation("model", "must be a non-empty string such as 'sonnet' or 'opus'")
        )
    for name, value in (
        ("session_id", options.get("session_id")),
        ("fallback_model", options.get("fallback_model")),
    ):
        if value is not None and not isinstance(value, str):
            problems.append(FieldViolation(name, "must be a string or None"))
    thinking = options.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        problems.append(
            FieldViolation(
                "thinking",
                "must be True, False or None; the wrapper refuses the older "
                "{'type': ..., 'budget_tokens': ...} object",
            )
        )
    if not isinstance(options.get("include_files", False), bool):
        problems.append(FieldViolation("include_files", "must be True or False"))
    servers = options.get("mcp_servers")
    if servers is not None:
        problems.extend(_check_mcp_servers(servers))
    return problems


def _sent_options(options: RequestOptions) -> dict[str, Any]:
    """The options sent only when set, under the wrapper's names (``model`` is always sent)."""
    servers = options.get("mcp_servers")
    fields = {
        "session_id": options.get("session_id"),
        "thinking": options.get("thinking"),
        "fallback_model": options.get("fallback_model"),
        "mcp_servers": None if servers is None else _plain(servers),
        "include_files": True if options.get("include_files") else None,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _plain(servers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {name: dict(config) for name, config in servers.items()}


def _check_messages(messages: object) -> list[FieldViolation]:
    if isinstance(messages, str | bytes) or not isinstance(messages, SEQUENCE):
        return [FieldViolation("messages", "must be a list of {'role': ..., 'content': ...} dicts")]
    problems = []
    if not messages:
        problems.append(
            FieldViolation("messages", "must hold at least one message; the CLI needs a prompt")
        )
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, MAPPING):
            problems.append(FieldViolation(where, "must be a dict with 'role' and 'content'"))
            continue
        role = message.get("role")
        if role not in ROLES:
            hint = (
                "; the wrapper drops system messages, put instructions in a user message"
                if role == "system"
                else ""
            )
            problems.append(FieldViolation(f"{where}.role", f"must be 'user' or 'assistant'{hint}"))
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(
                FieldViolation(
                    f"{where}.content",
                    "must be a string; the wrapper refuses content blocks, join their text instead",
                )
            )
        elif not content:
            # An empty message can leave the CLI an empty prompt, which it refuses as a failure.
            problems.append(FieldViolation(f"{where}.content", "must not be empty"))
    return problems


def _check_mcp_servers(servers: object) -> Iterable[FieldViolation]:
    if not isinstance(servers, MAPPING):
        yield FieldViolation("mcp_servers", "must be a dict of server name to configuration")
        return
    for name, config in servers.items():
        where = f"mcp_servers.{name}"
        if not isinstance(config, MAPPING):
            yield FieldViolation(where, "must be a dict such as {'command': ...} or {'url': ...}")
            continue
        strings = ("command", "url", "transport", "auth_type", "auth_token")
        wrong = [f for f in strings if not isinstance(config.get(f), str | None)]
        if "streamable_http_path" in config and not isinstance(config["streamable_http_path"], str):
            wrong.append("streamable_http_path")
        for field_name in wrong:
            yield FieldViolation(f"{where}.{field_name}", "must be a string")
        if not wrong:
            rule = _mcp_rule(config)
            if rule is not None:
                yield FieldViolation(f"{where}.{rule[0]}" if rule[0] else where, rule[1])
        args = config.get("args")
        if args is not None and (
            isinstance(args, str)
            or not isinstance(args, SEQUENCE)
            or not all(isinstance(arg, str) for arg in args)
        ):
            yield FieldViolation(f"{where}.args", "must be a list of strings")
        env = config.get("env")
        if env is not None and not (
            isinstance(env, MAPPING) and all(isinstance(v, str) for v in env.values())
        ):
            yield FieldViolation(f"{where}.env", "must be a dict of strings")


def _mcp_rule(config: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """The wrapper's MCP validator, in its order: it tests truthiness, not presence.

    The field to blame (empty for the server as a whole), the rule broken, and the wrapper's own
    words for it (what its 422 says after ``Value error, ``), or ``None``.
    """
    command, url, transport = config.get("command"), config.get("url"), config.get("transport")
    auth_type, auth_token = config.get("auth_type"), config.get("auth_token")
    if transport and transport not in TRANSPORTS:
        return (
            "transport",
            "must be 'sse' or 'streamableHttp'",
            "transport must be 'sse' or 'streamableHttp'",
        )
    if transport and not url:
        return (
            "url",
            "is required with a transport",
            "transport requires 'url' to be provided",
        )
    if auth_type and auth_type not in AUTH_TYPES:
        return (
            "auth_type",
            "must be 'jwt', 'oauth' or 'bearer'",
            "auth_type must be 'jwt', 'oauth', or 'bearer'",
        )
    if auth_type and not auth_token:
        return (
            "auth_token",
            f"is required with auth_type {auth_type!r}",
            "auth_type requires 'auth_token' to be provided",
        )
    if not command and not url:
        return (
            "",
            "needs 'command' (a local server) or 'url' (a remote one)",
            "Either 'command' or 'url' must be provided",
        )
    if command and url:
        return (
            "",
            "takes 'command' or 'url', not both",
            "Cannot specify both 'command' and 'url'",
        )
    if url and not transport:
        return (
            "transport",
            "is required with a url: 'sse' or 'streamableHttp'",
            "'url' requires 'transport' to be provided",
        )
    return None


def violations_from_422(document: object, redactor: Redactor | None = None) -> list[FieldViolation]:
    """The fields a FastAPI 422 ``{"detail": [...]}`` names, without the ``body`` prefix.

    Only locations and messages are kept: ``input`` echoes what was sent, tokens included.
    Both pass ``redactor`` (the exchange's tokens), since a message can quote the input too.
    """
    detail = document.get("detail") if isinstance(document, MAPPING) else None
    if not isinstance(detail, list):
        return [FieldViolation("body", "the wrapper refused the request without details")]
    clean = (redactor or Redactor()).redact
    found = []
    for item in detail:
        if not isinstance(item, MAPPING):
            continue
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        message = item.get("msg")
        found.append(
            FieldViolation(
                clean(".".join(location) or "body"),
                clean(message.removeprefix("Value error, "))
                if isinstance(message, str)
                else "invalid",
            )
        )
    return found or [FieldViolation("body", "the wrapper refused the request without details")]


# -- response values ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ContentBlock:
    """One block of a reply: ``type`` is ``text``, ``thinking``, ``tool_use``, ...

    ``text`` is the block's text for ``text`` and ``thinking`` blocks, empty otherwise;
    ``raw`` is the block as the wrapper sent it.
    """

    type: str
    text: str = ""
    raw: Mapping[str, Any] = field(default_factory=_empty, repr=False, compare=False)

    @classmethod
    def parse(cls, data: object) -> ContentBlock:
        """A block from its JSON object; unknown block types are kept, not refused."""
        if not isinstance(data, MAPPING):
            return cls(type="unknown", raw=MappingProxyType({"value": data}))
        kind = str(data.get("type", "unknown"))
        text = data.get("thinking") if kind == "thinking" else data.get("text")
        text = text if isinstance(text, str) else ""
        return cls(type=kind, text=text, raw=MappingProxyType(dict(data)))


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkspaceFile:
    """A file from the CLI's workspace (``include_files``): its relative ``path`` and content.

    ``content`` is text or base64 as ``encoding`` says; :attr:`data` decodes it to bytes. An
    encoding credkeeper does not know is kept as sent (the reply is not thrown away for it) and
    only :attr:`data` refuses it.
    """

    path: str
    content: str
    encoding: str
    size: int | None = None

    @classmethod
    def parse(cls, data: object) -> WorkspaceFile:
        """A file from the wrapper's ``{path, content, encoding, size}`` object."""
        if not isinstance(data, MAPPING):
            raise WrapperError("the wrapper returned a file entry that is not an object")
        path, content, encoding = data.get("path"), data.get("content"), data.get("encoding")
        if not isinstance(path, str) or not isinstance(content, str):
            raise WrapperError("the wrapper returned a file entry without a path or content")
        if not isinstance(encoding, str):
            raise WrapperError(f"the wrapper returned file {path!r} without an encoding")
        size = data.get("size")
        return cls(
            path=path,
            content=content,
            encoding=encoding,
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        )

    @property
    def data(self) -> bytes:
        """The file's bytes: UTF-8 text, or the decoded base64."""
        if self.encoding == "text":
            return self.content.encode()
        if self.encoding != "base64":
            raise WrapperError(
                f"the wrapper returned file {self.path!r} in unknown encoding {self.encoding!r}"
            )
        try:
            return base64.b64decode(self.content, validate=True)
        except (binascii.Error, ValueError):
            raise WrapperError(
                f"the wrapper returned file {self.path!r} with invalid base64 content"
            ) from None

    def target(self, directory: Path) -> Path:
        """Where this file goes under ``directory``; :class:`UnsafeFilePath` if it would escape."""
        relative = PurePosixPath(self.path)
        if (
            not self.path
            or "\\" in self.path
            or "\x00" in self.path
            or relative.is_absolute()
            or any(part == ".." for part in relative.parts)
        ):
            raise UnsafeFilePath(
                f"refusing to save {self.path!r}: a workspace file must be a relative path "
                "without '..'"
            )
        root = directory.resolve()
        target = root.joinpath(*relative.parts)
        # A symlink already in the directory could still lead out of it.
        if not target.parent.resolve().is_relative_to(root) or target.is_symlink():
            raise UnsafeFilePath(
                f"refusing to save {self.path!r}: it leads outside {str(directory)!r}"
            )
        return target


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A complete reply from ``POST /v1/messages``.

    ``text`` joins the text blocks. ``model`` is what the wrapper reports (the alias as sent,
    for the real wrapper). ``files`` holds the workspace snapshot when ``include_files`` was set;
    :meth:`save_files` writes it out safely.
    """

    content: tuple[ContentBlock, ...]
    model: str
    usage: Mapping[str, Any] = field(default_factory=_empty)
    files: tuple[WorkspaceFile, ...] = ()
    files_summary: Mapping[str, Any] = field(default_factory=_empty)
    raw: Any = field(default=None, repr=False, compare=False)

    @property
    def text(self) -> str:
        """The reply's text: every ``text`` block, joined."""
        return "".join(block.text for block in self.content if block.type == "text")

    def save_files(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write :attr:`files` under ``directory``; the paths written.

        Every path is checked before anything is written: one that is absolute, holds ``..``
        or leads through a symlink out of ``directory`` raises :class:`UnsafeFilePath` and
        nothing is written. Base64 content is decoded.
        """
        root = Path(directory)
        planned = [(file.target(root), file.data) for file in self.files]
        for target, data in planned:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return [target for target, _ in planned]

    @classmethod
    def parse(cls, document: Any, *, model: str) -> Message:
        """A message from a 200 body: the envelope, or the raw JSON value the wrapper returns
        when the model's reply is itself valid JSON."""
        if not (isinstance(document, MAPPING) and document.get("type") == "message"):
            text = json.dumps(document, ensure_ascii=False)
            return cls(content=(ContentBlock(type="text", text=text),), model=model, raw=document)
        blocks = document.get("content")
        files = document.get("files")
        return cls(
            content=tuple([ContentBlock.parse(block) for block in blocks])
            if isinstance(blocks, list)
            else (),
            model=str(document.get("model") or model),
            usage=_frozen(document.get("usage")),
            files=tuple([WorkspaceFile.parse(f) for f in files]) if isinstance(files, list) else (),
            files_summary=_frozen(document.get("files_summary")),
            raw=document,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """``GET /health``: the wrapper's status and version."""

    status: str
    version: str | None = None
    security_level: str | None = None
    timestamp: float | None = None

    @classmethod
    def parse(cls, document: object) -> Health:
        """From the wrapper's ``{"status", "version", "security_level", "timestamp"}``."""
        if not isinstance(document, MAPPING) or not isinstance(document.get("status"), str):
            raise WrapperError("the wrapper's /health answer has no status")
        version, level, stamp = (
            document.get("version"),
            document.get("security_level"),
            document.get("timestamp"),
        )
        return cls(
            status=document["status"],
            version=version if isinstance(version, str) else None,
            security_level=level if isinstance(level, str) else None,
            timestamp=float(stamp) if isinstance(stamp, int | float) else None,
        )


# -- stream events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One object of a streamed reply; ``type`` as sent, ``raw`` the whole object.

    Types credkeeper knows get a subclass; any other is an :class:`Event` as is.
    """

    type: str
    raw: Mapping[str, Any] = field(default_factory=_empty, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemEvent(Event):
    """``system`` objects, such as ``init`` with the session id and the resolved model."""

    subtype: str | None = None
    session_id: str | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEvent(Event):
    """A ``stream_event``: one Anthropic streaming event (``content_block_delta``, ...).

    ``text`` is the delta's text for ``text_delta``, ``thinking`` for ``thinking_delta``.
    """

    event_type: str = ""
    event: Mapping[str, Any] = field(default_factory=_empty, repr=False, compare=False)
    text: str | None = None
    thinking: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AssistantEvent(Event):
    """An ``assistant`` object: a complete Anthropic message of this turn."""

    content: tuple[ContentBlock, ...] = ()
    model: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultEvent(Event):
    """The final ``result`` object, which ends the stream.

    ``result`` is the whole reply text; a failed turn has ``is_error`` set and the error in
    ``result``.
    """

    subtype: str | None = None
    is_error: bool = False
    result: str = ""
    session_id: str | None = None
    duration_ms: int | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    usage: Mapping[str, Any] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileEvent(Event):
    """``file_created`` (keepalive with ``include_files``): one workspace file."""

    file: WorkspaceFile


@dataclass(frozen=True, slots=True, kw_only=True)
class FilesBatchEvent(Event):
    """``files_batch`` (keepalive with ``include_files``): the workspace files at the end."""

    files: tuple[WorkspaceFile, ...] = ()


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_event(data: Mapping[str, Any]) -> Event:
    """The typed event for one ``stream-json`` object (``error`` objects are the caller's)."""
    kind = str(data.get("type", ""))
    raw = _frozen(data)
    if kind == "system":
        return SystemEvent(
            type=kind,
            raw=raw,
            subtype=_str(data.get("subtype")),
            session_id=_str(data.get("session_id")),
            model=_str(data.get("model")),
        )
    if kind == "stream_event":
        event = _frozen(data.get("event"))
        delta = _frozen(event.get("delta"))
        return StreamEvent(
            type=kind,
            raw=raw,
            event_type=str(event.get("type", "")),
            event=event,
            text=_str(delta.get("text")) if delta.get("type") == "text_delta" else None,
            thinking=_str(delta.get("thinking")) if delta.get("type") == "thinking_delta" else None,
        )
    if kind == "assistant":
        message = _frozen(data.get("message"))
        blocks = message.get("content")
        return AssistantEvent(
            type=kind,
            raw=raw,
            content=tuple(ContentBlock.parse(b) for b in blocks)
            if isinstance(blocks, list)
            else (),
            model=_str(message.get("model")),
        )
    if kind == "result":
        cost = data.get("total_cost_usd")
        return ResultEvent(
            type=kind,
            raw=raw,
            subtype=_str(data.get("subtype")),
            is_error=data.get("is_error") is True,
            result=_str(data.get("result")) or "",
            session_id=_str(data.get("session_id")),
            duration_ms=_int(data.get("duration_ms")),
            num_turns=_int(data.get("num_turns")),
            total_cost_usd=float(cost) if isinstance(cost, int | float) else None,
            usage=_frozen(data.get("usage")),
        )
    if kind == "file_created":
        return FileEvent(type=kind, raw=raw, file=WorkspaceFile.parse(data))
    if kind == "files_batch":
        files = data.get("files")
        return FilesBatchEvent(
            type=kind,
            raw=raw,
            files=tuple(WorkspaceFile.parse(f) for f in files) if isinstance(files, list) else (),
        )
    return Event(type=kind, raw=raw)


class End(enum.Enum):
    """The marker :func:`parse_line` returns for SSE's ``data: [DONE]``."""

    DONE = "done"


DONE = End.DONE


def read_line(line: str) -> Mapping[str, Any] | Literal[End.DONE] | WrapperError | None:
    """One line of a streamed body: a JSON object, :data:`DONE`, or ``None`` to skip.

    NDJSON lines (``/v1/messages``) and SSE ``data:`` lines (``/keepalive``) both read here;
    blank lines and the other SSE fields are skipped. A line that is no JSON object comes back
    as a :class:`WrapperError` for the caller to raise: this frame holds the line, which may
    quote a token, and must not be on the error's traceback.
    """
    text = line.strip()
    if not text or text.startswith(":"):
        return None
    if text.startswith("data:"):
        text = text[5:].strip()
        if text == "[DONE]":
            return DONE
    elif text.split(":", 1)[0] in ("event", "id", "retry"):
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return WrapperError("the wrapper's stream holds a line that is not JSON")
    if not isinstance(document, MAPPING):
        return WrapperError("the wrapper's stream holds a line that is not a JSON object")
    return document
