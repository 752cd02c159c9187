"""Requests and answers of the Claude Wrapper API: validation, parsing and classification."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest

from credkeeper import (
    AuthFailed,
    Credentials,
    InvalidRequest,
    UnsafeFilePath,
    UsageLimitReached,
    WrapperCLIError,
    WrapperError,
    WrapperUnavailable,
)
from credkeeper._messages import DONE, build_body, parse_event, read_line, violations_from_422
from credkeeper._redact import Redactor
from credkeeper._wrapper import Attempt, Fetch, Refused, Renew, call_flow, interpret
from credkeeper.wrapper import (
    AssistantEvent,
    FieldViolation,
    FileEvent,
    FilesBatchEvent,
    Message,
    RequestOptions,
    ResultEvent,
    StreamEvent,
    SystemEvent,
    WorkspaceFile,
)

ACCESS = "sk-ant-oat01-" + "a" * 40
REFRESH = "sk-ant-ort01-" + "r" * 40
SECRETS = (ACCESS, REFRESH)
ODD = "opaque/QZXJ+4711="
USER = [{"role": "user", "content": "hello"}]


def body(messages: Any = USER, **options: Any) -> dict[str, Any]:
    return build_body(messages, cast(RequestOptions, options))


def fields_of(error: pytest.ExceptionInfo[InvalidRequest]) -> list[str]:
    return [violation.field for violation in error.value.errors]


class TestBuildBody:
    def test_minimal_body(self) -> None:
        """A plain request sends the messages and the model, nothing else."""
        assert {"messages": USER, "model": "sonnet"} == body()

    def test_defaults_given_explicitly(self) -> None:
        """Every option given at its default makes the same body as none given."""
        defaults = body(
            model="sonnet",
            session_id=None,
            thinking=None,
            fallback_model=None,
            include_files=False,
            mcp_servers=None,
            timeout=None,
        )

        assert body() == defaults

    def test_unknown_option_refused(self) -> None:
        """A keyword that is no request option is a TypeError naming it and the options."""
        with pytest.raises(TypeError, match=r"'modle'.*fallback_model, include_files"):
            body(modle="opus")

    def test_optional_fields_sent_when_set(self) -> None:
        """Set options appear in the body under the wrapper's names."""
        sent = body(session_id="s1", thinking=True, fallback_model="haiku", include_files=True)

        assert ("s1", True, "haiku", True) == (
            sent["session_id"],
            sent["thinking"],
            sent["fallback_model"],
            sent["include_files"],
        )

    def test_content_blocks_refused(self) -> None:
        """A list of content blocks is refused, naming the message's content field."""
        with pytest.raises(InvalidRequest) as error:
            body([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])

        assert ["messages.0.content"] == fields_of(error)

    def test_unknown_role_refused(self) -> None:
        """A role other than user or assistant is refused; system gets a hint."""
        with pytest.raises(InvalidRequest) as error:
            body([{"role": "system", "content": "be brief"}])

        assert ("messages.0.role", True) == (
            error.value.errors[0].field,
            "drops system messages" in error.value.errors[0].message,
        )

    def test_empty_messages_refused(self) -> None:
        """An empty history is refused: the CLI would get an empty prompt."""
        with pytest.raises(InvalidRequest) as error:
            body([])

        assert ["messages"] == fields_of(error)

    def test_thinking_object_refused(self) -> None:
        """The older thinking object is refused; thinking is a boolean."""
        with pytest.raises(InvalidRequest) as error:
            body(thinking={"type": "enabled", "budget_tokens": 1000})

        assert ["thinking"] == fields_of(error)

    def test_every_violation_listed(self) -> None:
        """All violations come back together, in one error."""
        with pytest.raises(InvalidRequest) as error:
            body([{"role": "bot", "content": 3}], thinking="yes", model="")

        assert ["messages.0.role", "messages.0.content", "model", "thinking"] == fields_of(error)

    @pytest.mark.parametrize(
        ("config", "field"),
        [
            ({}, "mcp_servers.s"),
            ({"command": "x", "url": "http://h", "transport": "sse"}, "mcp_servers.s"),
            ({"url": "http://h"}, "mcp_servers.s.transport"),
            ({"command": "x", "transport": "sse"}, "mcp_servers.s.url"),
            ({"url": "http://h", "transport": "websocket"}, "mcp_servers.s.transport"),
            ({"command": "x", "auth_type": "bearer"}, "mcp_servers.s.auth_token"),
            ({"command": "x", "auth_type": "basic", "auth_token": "t"}, "mcp_servers.s.auth_type"),
            ({"command": "x", "args": "--flag"}, "mcp_servers.s.args"),
            ({"command": "x", "env": {"A": 1}}, "mcp_servers.s.env"),
        ],
    )
    def test_mcp_rules(self, config: dict[str, Any], field: str) -> None:
        """MCP servers follow the wrapper's validator rules."""
        with pytest.raises(InvalidRequest) as error:
            body(mcp_servers={"s": config})

        assert [field] == fields_of(error)

    @pytest.mark.parametrize(
        "config",
        [
            {"command": "", "url": "https://h/mcp", "transport": "sse"},
            {"command": "npx", "auth_type": ""},
            {"command": "npx", "url": ""},
        ],
    )
    def test_empty_strings_count_as_absent(self, config: dict[str, Any]) -> None:
        """Like the wrapper's validator, an empty string counts as not given."""
        assert {"s": config} == body(mcp_servers={"s": config})["mcp_servers"]

    def test_non_string_mcp_field_refused(self) -> None:
        """A non-string command is refused before it goes out with the tokens."""
        with pytest.raises(InvalidRequest) as error:
            body(mcp_servers={"s": {"command": ["npx", "server"]}})

        assert ["mcp_servers.s.command"] == fields_of(error)

    def test_valid_mcp_servers_sent(self) -> None:
        """A local and a remote MCP server pass and are sent as given."""
        servers = {
            "local": {"command": "npx", "args": ["server"], "env": {"A": "1"}},
            "remote": {"url": "https://h/mcp", "transport": "streamableHttp"},
        }

        assert servers == body(mcp_servers=servers)["mcp_servers"]

    def test_invalid_request_is_value_error(self) -> None:
        """InvalidRequest is a ValueError, raised before any network use."""
        with pytest.raises(ValueError, match=r"messages\.0\.content"):
            body([{"role": "user", "content": None}])


class TestViolationsFrom422:
    def test_locations_without_body_prefix(self) -> None:
        """A FastAPI 422 becomes field paths without the body prefix or the Value error label."""
        detail = {
            "detail": [
                {
                    "type": "string_type",
                    "loc": ["body", "messages", 0, "content"],
                    "msg": "Input should be a valid string",
                    "input": [{"type": "text"}],
                },
                {
                    "type": "value_error",
                    "loc": ["body", "mcp_servers", "s"],
                    "msg": "Value error, Either 'command' or 'url' must be provided",
                    "input": {},
                },
            ]
        }

        assert [
            FieldViolation("messages.0.content", "Input should be a valid string"),
            FieldViolation("mcp_servers.s", "Either 'command' or 'url' must be provided"),
        ] == violations_from_422(detail)

    def test_messages_redacted(self) -> None:
        """A message quoting the tokens sent has them masked, whatever their encoding."""
        detail = {
            "detail": [
                {
                    "loc": ["body", "oauth_credentials"],
                    "msg": f"Value error, bad {ODD} and {quote(ODD, safe='')}",
                }
            ]
        }

        assert [
            FieldViolation("oauth_credentials", "bad [REDACTED] and [REDACTED]")
        ] == violations_from_422(detail, Redactor([ODD]))

    def test_input_not_quoted(self) -> None:
        """The echoed input, which holds tokens, stays out of the error."""
        detail = {"detail": [{"loc": ["body", "x"], "msg": "bad", "input": {"t": ACCESS}}]}

        error = InvalidRequest(violations_from_422(detail), status=422)

        assert ACCESS not in str(error)


class TestMessage:
    def test_envelope(self) -> None:
        """The wrapper's envelope gives the text, the model and the usage."""
        document = {
            "type": "message",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
            "model": "sonnet",
            "usage": {"input_tokens": 3},
        }

        message = Message.parse(document, model="opus")

        assert ("Hi there", "sonnet", {"input_tokens": 3}) == (
            message.text,
            message.model,
            dict(message.usage),
        )

    def test_raw_json_reply(self) -> None:
        """A reply that is itself JSON arrives without envelope and becomes the text."""
        message = Message.parse({"a": 1}, model="haiku")

        assert ('{"a": 1}', "haiku") == (message.text, message.model)

    def test_files_saved_with_base64_decoded(self, tmp_path: Path) -> None:
        """save_files writes text and decoded base64 files under the directory."""
        binary = bytes(range(256))
        message = Message.parse(
            {
                "type": "message",
                "content": [],
                "model": "sonnet",
                "files": [
                    {"path": "a/notes.txt", "content": "hello", "encoding": "text", "size": 5},
                    {
                        "path": "img.bin",
                        "content": base64.b64encode(binary).decode(),
                        "encoding": "base64",
                        "size": 256,
                    },
                ],
            },
            model="sonnet",
        )

        written = message.save_files(tmp_path)

        assert (
            [tmp_path.resolve() / "a/notes.txt", tmp_path.resolve() / "img.bin"],
            b"hello",
            binary,
        ) == (written, (tmp_path / "a/notes.txt").read_bytes(), (tmp_path / "img.bin").read_bytes())

    @pytest.mark.parametrize(
        "path", ["../escape.txt", "a/../../escape.txt", "/etc/passwd", "a\\..\\b", "", "a\x00b"]
    )
    def test_escaping_paths_refused(self, tmp_path: Path, path: str) -> None:
        """A path out of the directory is refused."""
        file = WorkspaceFile(path=path, content="x", encoding="text")

        with pytest.raises(UnsafeFilePath):
            Message(content=(), model="m", files=(file,)).save_files(tmp_path / "out")

    def test_nothing_written_when_one_path_is_bad(self, tmp_path: Path) -> None:
        """One bad path means no file at all is written."""
        files = (
            WorkspaceFile(path="good.txt", content="x", encoding="text"),
            WorkspaceFile(path="../bad.txt", content="x", encoding="text"),
        )

        with pytest.raises(UnsafeFilePath):
            Message(content=(), model="m", files=files).save_files(tmp_path)

        assert [] == list(tmp_path.iterdir())

    def test_symlink_out_refused(self, tmp_path: Path) -> None:
        """A path through a symlink leading out of the directory is refused."""
        outside = tmp_path / "outside"
        outside.mkdir()
        root = tmp_path / "root"
        root.mkdir()
        (root / "link").symlink_to(outside)
        file = WorkspaceFile(path="link/x.txt", content="x", encoding="text")

        with pytest.raises(UnsafeFilePath):
            Message(content=(), model="m", files=(file,)).save_files(root)

        assert [] == list(outside.iterdir())

    def test_bad_base64_named(self) -> None:
        """Invalid base64 content is an error naming the file."""
        file = WorkspaceFile(path="x.bin", content="@@@", encoding="base64")

        with pytest.raises(WrapperError, match=r"x\.bin"):
            file.data  # noqa: B018 - the property is the subject


class TestRedactor:
    def test_repr_hides_the_secrets(self) -> None:
        """A redactor's repr, which tracebacks may capture, shows no secret."""
        assert "Redactor(2 secrets)" == repr(Redactor(SECRETS))

    def test_excerpt_masks_the_secrets(self) -> None:
        """Its excerpt masks each of its secrets."""
        assert "a [REDACTED] b" == Redactor(["hunter2"]).excerpt("a hunter2 b")


class TestParseLine:
    def test_ndjson_line(self) -> None:
        """A bare JSON line is an object."""
        assert {"type": "result"} == read_line('{"type": "result"}\n')

    def test_sse_data_line(self) -> None:
        """An SSE data line is its JSON object."""
        assert {"type": "system"} == read_line('data: {"type": "system"}')

    def test_done(self) -> None:
        """data: [DONE] ends the stream."""
        assert DONE is read_line("data: [DONE]")

    @pytest.mark.parametrize("line", ["", "   ", ": keepalive", "event: message", "id: 3"])
    def test_skipped(self, line: str) -> None:
        """Blank lines, comments and other SSE fields are skipped."""
        assert read_line(line) is None

    def test_garbage_refused(self) -> None:
        """A line that is not JSON comes back as a WrapperError that does not quote it."""
        error = read_line(f"oops {ACCESS}")

        assert (WrapperError, False) == (type(error), ACCESS in str(error))

    def test_deep_nesting_refused(self) -> None:
        """A line nested too deep to decode is a WrapperError, not a RecursionError."""
        assert isinstance(read_line("[" * 100_000), WrapperError)


class TestParseEvent:
    def test_system(self) -> None:
        """system/init carries the session id and model."""
        event = parse_event({"type": "system", "subtype": "init", "session_id": "s", "model": "m"})

        assert SystemEvent(type="system", subtype="init", session_id="s", model="m") == event

    def test_text_delta(self) -> None:
        """A content_block_delta with a text_delta exposes its text."""
        event = parse_event(
            {
                "type": "stream_event",
                "event": {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "Hel"},
                },
            }
        )

        assert isinstance(event, StreamEvent)
        assert ("content_block_delta", "Hel", None) == (
            event.event_type,
            event.text,
            event.thinking,
        )

    def test_assistant(self) -> None:
        """assistant carries the full message's blocks."""
        event = parse_event(
            {
                "type": "assistant",
                "message": {"model": "m", "content": [{"type": "text", "text": "x"}]},
            }
        )

        assert isinstance(event, AssistantEvent)
        assert ("m", "x") == (event.model, event.content[0].text)

    def test_result(self) -> None:
        """result carries the reply, the error flag and the accounting."""
        event = parse_event(
            {
                "type": "result",
                "subtype": "success",
                "is_error": False,
                "result": "done",
                "duration_ms": 12,
                "num_turns": 1,
                "total_cost_usd": 0.01,
            }
        )

        assert isinstance(event, ResultEvent)
        assert ("success", False, "done", 12, 1, 0.01) == (
            event.subtype,
            event.is_error,
            event.result,
            event.duration_ms,
            event.num_turns,
            event.total_cost_usd,
        )

    def test_files(self) -> None:
        """file_created and files_batch carry workspace files."""
        file = {"path": "a.txt", "content": "x", "encoding": "text", "size": 1}
        created = parse_event({"type": "file_created", **file})
        batch = parse_event({"type": "files_batch", "files": [file], "count": 1})

        assert isinstance(created, FileEvent)
        assert isinstance(batch, FilesBatchEvent)
        assert ("a.txt", ("a.txt",)) == (created.file.path, tuple(f.path for f in batch.files))

    def test_unknown_kept(self) -> None:
        """An unknown object type is kept as a plain Event."""
        event = parse_event({"type": "user", "message": {}})

        assert ("user", False) == (event.type, isinstance(event, StreamEvent))


def error_body(message: str, code: str = "cli_error") -> bytes:
    return json.dumps({"type": "error", "error": {"message": message, "code": code}}).encode()


def read(status: int, content: bytes) -> Message | Refused:
    response = httpx.Response(status, content=content)
    return interpret(response, key="alice", model="sonnet", redactor=Redactor(SECRETS))


class TestInterpret:
    @pytest.mark.parametrize(
        "text",
        [
            "Invalid API key · Please run /login",
            "Not logged in · Please run /login",
            'Failed to authenticate. API Error: 401 {"type":"error","error":{"type":'
            '"authentication_error","message":"OAuth token has expired."}}',
            "OAuth token revoked · Please run /login",
            'API Error: 401 {"type":"error","error":{"type":"authentication_error"}}',
            "Your account does not have access to Claude. "
            "Please login again or contact your administrator.",
        ],
    )
    def test_auth_texts_refused(self, text: str) -> None:
        """Every known auth failure text in a 200 body is a refusal, to refresh and retry."""
        assert isinstance(read(200, error_body(text)), Refused)

    def test_http_401_refused(self) -> None:
        """HTTP 401 is a refusal too."""
        assert isinstance(read(401, b'{"detail": "Invalid OAuth token format"}'), Refused)

    @pytest.mark.parametrize(
        "text",
        [
            "Opus weekly limit reached ∙ resets Nov 10, 5pm",
            'API Error: 429 {"type":"error","error":{"type":"rate_limit_error"}}',
            "Claude usage limit reached. Your limit will reset at 5pm",
            "You've hit your limit · resets 8pm",
            "You've hit your session limit · resets 2pm",
        ],
    )
    def test_limits_are_not_auth(self, text: str) -> None:
        """Usage limits raise UsageLimitReached and never count as auth failures."""
        with pytest.raises(UsageLimitReached):
            read(200, error_body(text))

    def test_other_cli_error(self) -> None:
        """Another cli_error raises WrapperCLIError with the redacted text."""
        with pytest.raises(WrapperCLIError, match="Command failed"):
            read(200, error_body(f"Command failed --token {ACCESS}"))

    def test_server_error_redacted(self) -> None:
        """A 500 echoing the CLI argv raises WrapperUnavailable without the tokens."""
        detail = (
            f"Server error: Command '['claude', '--settings', '{{\"credentials\": "
            f'{{"accessToken": "{ACCESS}", "refreshToken": "{REFRESH}"}}}}\']\' '
            "timed out after 180 seconds"
        )

        with pytest.raises(WrapperUnavailable) as error:
            read(500, json.dumps({"detail": detail}).encode())

        assert (500, False, False) == (
            error.value.status,
            ACCESS in str(error.value) + error.value.excerpt,
            REFRESH in str(error.value) + error.value.excerpt,
        )

    def test_422_lists_fields(self) -> None:
        """A 422 that still comes back raises InvalidRequest listing the fields."""
        detail = {
            "detail": [{"loc": ["body", "thinking"], "msg": "Input should be a valid boolean"}]
        }

        with pytest.raises(InvalidRequest) as error:
            read(422, json.dumps(detail).encode())

        assert (422, ["thinking"]) == (error.value.status, fields_of(error))

    def test_not_json(self) -> None:
        """A 200 that is not JSON is a WrapperError."""
        with pytest.raises(WrapperError, match="not JSON"):
            read(200, b"<html>")


def credentials(token: str) -> Credentials:
    return Credentials(
        access_token=token,
        refresh_token=REFRESH,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )


class TestCallFlow:
    def test_success_needs_one_attempt(self) -> None:
        """A good answer ends the flow after one attempt."""
        flow = call_flow("alice")
        assert Fetch("alice") == next(flow)
        first = credentials(ACCESS)
        assert Attempt(first) == flow.send(first)

        with pytest.raises(StopIteration) as stop:
            flow.send("answer")

        assert "answer" == stop.value.value

    def test_refusal_renews_with_the_failed_token_and_retries(self) -> None:
        """A refusal asks for a refresh naming the refused token, then retries once."""
        flow = call_flow("alice")
        next(flow)
        first, second = credentials(ACCESS), credentials("sk-ant-oat01-new")
        flow.send(first)

        renew = flow.send(Refused("Invalid API key"))
        retry = flow.send(second)

        assert (Renew("alice", first.access_token), Attempt(second)) == (renew, retry)

    def test_second_refusal_raises(self) -> None:
        """A second refusal raises AuthFailed naming the key."""
        flow = call_flow("alice")
        next(flow)
        flow.send(credentials(ACCESS))
        flow.send(Refused("x"))
        flow.send(credentials("sk-ant-oat01-new"))

        with pytest.raises(AuthFailed, match="'alice'"):
            flow.send(Refused("Invalid API key"))
