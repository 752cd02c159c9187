"""FakeWrapper: the Claude Wrapper API over real loopback HTTP."""

from __future__ import annotations

import base64
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from credkeeper import (
    AsyncTokenManager,
    AsyncWrapperClient,
    Credentials,
    MemoryStore,
    Secret,
    TokenManager,
    WrapperClient,
)
from credkeeper.testing import FakeClock, FakeProvider, FakeWrapper, WrapperCall, WrapperFault

EIGHT_HOURS = 8 * 3600
PYDANTIC = "https://errors.pydantic.dev/2.5/v/"

MakeWrapper = Callable[..., FakeWrapper]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as http:
        yield http


@pytest.fixture
def make_wrapper(fake: FakeProvider) -> Iterator[MakeWrapper]:
    started: list[FakeWrapper] = []

    def make(**options: Any) -> FakeWrapper:
        wrapper = FakeWrapper(fake, **options).start()
        started.append(wrapper)
        return wrapper

    yield make
    for wrapper in started:
        wrapper.stop()


@pytest.fixture
def wrapper(make_wrapper: MakeWrapper) -> FakeWrapper:
    return make_wrapper()


@pytest.fixture
def credentials(fake: FakeProvider) -> Credentials:
    return fake.issue()


def body(credentials: Credentials, *prompts: str, **fields: Any) -> dict[str, Any]:
    """A request body; each prompt is a user message, alternating with nothing else."""
    return {
        "oauth_credentials": credentials.to_wrapper(),
        "messages": [{"role": "user", "content": prompt} for prompt in prompts or ("Hello",)],
        **fields,
    }


def post(
    client: httpx.Client, wrapper: FakeWrapper, document: object, path: str = "/v1/messages"
) -> httpx.Response:
    return client.post(wrapper.url + path, json=document)


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


def sse(response: httpx.Response) -> list[str]:
    """The data of each SSE event, in order."""
    assert response.text.endswith("\n\n")
    return [block.removeprefix("data: ") for block in response.text[:-2].split("\n\n")]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    """Each stream-json object's type, with the wrapped Anthropic event's type after a colon."""
    return [
        f"stream_event:{obj['event']['type']}" if obj["type"] == "stream_event" else obj["type"]
        for obj in objects
    ]


def detail(response: httpx.Response) -> list[dict[str, Any]]:
    assert 422 == response.status_code
    errors: list[dict[str, Any]] = response.json()["detail"]
    return errors


def cli_error(message: str, code: str = "cli_error") -> dict[str, Any]:
    return {"type": "error", "error": {"message": message, "code": code}}


def outcomes(wrapper: FakeWrapper) -> list[str]:
    return [call.outcome for call in wrapper.calls]


class TestHealth:
    def test_health_answers_the_v36_document(
        self, wrapper: FakeWrapper, client: httpx.Client, clock: FakeClock
    ) -> None:
        """GET /health answers status, version, security level and the clock's timestamp."""
        response = client.get(wrapper.url + "/health")

        expected = {
            "status": "healthy",
            "version": "v36-files-watcher",
            "security_level": "BALANCED",
            "timestamp": clock.now().timestamp(),
        }
        assert (200, expected) == (response.status_code, response.json())

    def test_unknown_route_is_fastapis_404(
        self, wrapper: FakeWrapper, client: httpx.Client
    ) -> None:
        """An unknown path answers 404 {"detail": "Not Found"}."""
        response = client.post(wrapper.url + "/v1/messages/pooled-nope", json={})

        assert (404, {"detail": "Not Found"}) == (response.status_code, response.json())

    def test_wrong_method_is_fastapis_405(self, wrapper: FakeWrapper, client: httpx.Client) -> None:
        """GET /v1/messages answers 405 Method Not Allowed, allowing POST."""
        response = client.get(wrapper.url + "/v1/messages")

        assert (405, "POST") == (response.status_code, response.headers["Allow"])


class TestValidation:
    def test_missing_oauth_credentials(self, wrapper: FakeWrapper, client: httpx.Client) -> None:
        """No oauth_credentials: a pydantic 'missing' error whose input is the whole body."""
        document = {"messages": [{"role": "user", "content": "Hi"}]}

        expected = {
            "type": "missing",
            "loc": ["body", "oauth_credentials"],
            "msg": "Field required",
            "input": document,
            "url": PYDANTIC + "missing",
        }
        assert [expected] == detail(post(client, wrapper, document))

    @pytest.mark.parametrize("name", ["access_token", "refresh_token", "expires_at"])
    def test_missing_credential_field(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials, name: str
    ) -> None:
        """Each of access_token, refresh_token and expires_at is required."""
        document = body(credentials)
        del document["oauth_credentials"][name]

        errors = detail(post(client, wrapper, document))

        assert [("missing", ["body", "oauth_credentials", name])] == [
            (error["type"], error["loc"]) for error in errors
        ]

    @pytest.mark.parametrize(
        ("value", "kind"),
        [("soon", "int_parsing"), (1.5, "int_from_float"), (None, "int_type")],
    )
    def test_non_int_expires_at(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        value: object,
        kind: str,
    ) -> None:
        """A non-integer expires_at gets pydantic's integer error for its input."""
        document = body(credentials)
        document["oauth_credentials"]["expires_at"] = value

        errors = detail(post(client, wrapper, document))

        assert [(kind, ["body", "oauth_credentials", "expires_at"], value)] == [
            (error["type"], error["loc"], error["input"]) for error in errors
        ]

    def test_numeric_string_expires_at_is_accepted(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Lax mode, as FastAPI runs pydantic: "1767254400000" is an int."""
        document = body(credentials)
        document["oauth_credentials"]["expires_at"] = str(
            document["oauth_credentials"]["expires_at"]
        )

        assert 200 == post(client, wrapper, document).status_code

    def test_null_subscription_type_is_rejected(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """subscription_type is a str with a default: null is a string_type error."""
        document = body(credentials)
        document["oauth_credentials"]["subscription_type"] = None

        errors = detail(post(client, wrapper, document))

        assert [("string_type", ["body", "oauth_credentials", "subscription_type"])] == [
            (error["type"], error["loc"]) for error in errors
        ]

    def test_missing_messages(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """No messages: a 'missing' error at body.messages."""
        document = body(credentials)
        del document["messages"]

        errors = detail(post(client, wrapper, document))

        assert [("missing", ["body", "messages"])] == [(e["type"], e["loc"]) for e in errors]

    def test_messages_not_a_list(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """messages as a string: 'Input should be a valid list'."""
        errors = detail(post(client, wrapper, body(credentials) | {"messages": "Hello"}))

        expected = {
            "type": "list_type",
            "loc": ["body", "messages"],
            "msg": "Input should be a valid list",
            "input": "Hello",
            "url": PYDANTIC + "list_type",
        }
        assert [expected] == errors

    def test_content_blocks_are_rejected(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Message content as a list of content blocks: a string_type error on content."""
        blocks = [{"type": "text", "text": "Hello"}]
        document = body(credentials) | {"messages": [{"role": "user", "content": blocks}]}

        expected = {
            "type": "string_type",
            "loc": ["body", "messages", 0, "content"],
            "msg": "Input should be a valid string",
            "input": blocks,
            "url": PYDANTIC + "string_type",
        }
        assert [expected] == detail(post(client, wrapper, document))

    def test_thinking_object_is_rejected(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The v35 thinking object fails v36's bool field with bool_type."""
        thinking = {"type": "enabled", "budget_tokens": 1024}

        errors = detail(post(client, wrapper, body(credentials, thinking=thinking)))

        assert [("bool_type", ["body", "thinking"], "Input should be a valid boolean")] == [
            (error["type"], error["loc"], error["msg"]) for error in errors
        ]

    def test_role_is_not_validated(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Any role string passes, as in the real server."""
        document = body(credentials) | {"messages": [{"role": "robot", "content": "x"}]}

        assert 422 != post(client, wrapper, document).status_code

    @pytest.mark.parametrize(
        ("server", "message"),
        [
            ({"command": "npx", "url": "https://m"}, "Cannot specify both 'command' and 'url'"),
            ({"args": ["-y"]}, "Either 'command' or 'url' must be provided"),
            ({"url": "https://m"}, "'url' requires 'transport' to be provided"),
            (
                {"url": "https://m", "transport": "websocket"},
                "transport must be 'sse' or 'streamableHttp'",
            ),
            ({"command": "npx", "transport": "sse"}, "transport requires 'url' to be provided"),
            (
                {"url": "https://m", "transport": "sse", "auth_type": "basic", "auth_token": "t"},
                "auth_type must be 'jwt', 'oauth', or 'bearer'",
            ),
            (
                {"url": "https://m", "transport": "sse", "auth_type": "jwt"},
                "auth_type requires 'auth_token' to be provided",
            ),
        ],
    )
    def test_mcp_validator_rules(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        server: dict[str, Any],
        message: str,
    ) -> None:
        """Each MCP rule fails as a 'Value error, ...' on the server's entry."""
        document = body(credentials, mcp_servers={"tools": server})

        expected = {
            "type": "value_error",
            "loc": ["body", "mcp_servers", "tools"],
            "msg": f"Value error, {message}",
            "input": server,
            "ctx": {"error": {}},
            "url": PYDANTIC + "value_error",
        }
        assert [expected] == detail(post(client, wrapper, document))

    @pytest.mark.parametrize(
        "server",
        [
            {"command": "npx", "args": ["-y", "server"], "env": {"DEBUG": "1"}},
            {"url": "https://m", "transport": "streamableHttp"},
            {"url": "https://m", "transport": "sse", "auth_type": "bearer", "auth_token": "t"},
        ],
    )
    def test_valid_mcp_servers_pass(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        server: dict[str, Any],
    ) -> None:
        """A local command, or a URL with a transport (and a token for auth_type), is valid."""
        response = post(client, wrapper, body(credentials, mcp_servers={"tools": server}))

        assert 200 == response.status_code

    def test_errors_are_collected(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Every violation is reported at once, in field order."""
        document = body(credentials, thinking={"type": "enabled"}, stream="maybe")
        document["messages"][0]["content"] = ["block"]
        del document["oauth_credentials"]["expires_at"]

        locs = [error["loc"] for error in detail(post(client, wrapper, document))]

        expected = [
            ["body", "oauth_credentials", "expires_at"],
            ["body", "messages", 0, "content"],
            ["body", "stream"],
            ["body", "thinking"],
        ]
        assert expected == locs

    def test_invalid_json_is_json_invalid(self, wrapper: FakeWrapper, client: httpx.Client) -> None:
        """A body that is not JSON: FastAPI's json_invalid error at its position."""
        response = client.post(
            wrapper.url + "/v1/messages",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )

        expected = {
            "type": "json_invalid",
            "loc": ["body", 1],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": "Expecting property name enclosed in double quotes"},
        }
        assert [expected] == detail(response)

    def test_empty_body_is_missing(self, wrapper: FakeWrapper, client: httpx.Client) -> None:
        """No body at all: 'missing' at ["body"]."""
        response = client.post(wrapper.url + "/v1/messages")

        assert [("missing", ["body"])] == [(e["type"], e["loc"]) for e in detail(response)]

    def test_keepalive_validates_the_same_body(
        self, wrapper: FakeWrapper, client: httpx.Client
    ) -> None:
        """/v1/messages/keepalive answers the same 422 before any stream starts."""
        response = post(client, wrapper, {"messages": []}, "/v1/messages/keepalive")

        assert [["body", "oauth_credentials"]] == [error["loc"] for error in detail(response)]


class TestAuthentication:
    def test_unknown_token_is_invalid_api_key(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A token the provider never issued: HTTP 200 cli_error 'Invalid API key'."""
        document = body(credentials)
        document["oauth_credentials"]["access_token"] = "sk-ant-oat01-forged"

        response = post(client, wrapper, document)

        expected = cli_error("Invalid API key · Please run /login")
        assert (200, expected) == (response.status_code, response.json())

    def test_expired_token_is_failed_to_authenticate(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        clock: FakeClock,
    ) -> None:
        """Past its expiry on the clock: the CLI's 401 authentication_error text."""
        clock.advance(EIGHT_HOURS + 1)

        response = post(client, wrapper, body(credentials))

        message = (
            'Failed to authenticate. API Error: 401 {"type":"error","error":{"type":'
            '"authentication_error","message":"OAuth token has expired. Please obtain a new '
            'token or refresh your existing token."}}'
        )
        assert (200, cli_error(message)) == (response.status_code, response.json())

    def test_revoked_token_is_oauth_token_revoked(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        fake: FakeProvider,
    ) -> None:
        """A revoked token: 'OAuth token revoked · Please run /login'."""
        fake.revoke(credentials)

        response = post(client, wrapper, body(credentials))

        assert cli_error(FakeWrapper.TOKEN_REVOKED) == response.json()

    def test_stream_request_gets_the_error_as_json(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """With stream: true an auth failure is a plain JSON body, not a stream."""
        document = body(credentials, stream=True)
        document["oauth_credentials"]["access_token"] = "sk-ant-oat01-forged"

        response = post(client, wrapper, document)

        assert ("application/json", cli_error(FakeWrapper.INVALID_API_KEY)) == (
            response.headers["Content-Type"],
            response.json(),
        )

    def test_empty_prompt_is_a_cli_error(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """An empty message list passes validation, then the CLI fails on the empty prompt."""
        response = post(client, wrapper, body(credentials) | {"messages": []})

        assert cli_error(FakeWrapper.EMPTY_PROMPT) == response.json()


class TestMessages:
    def test_success_envelope(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A good request: the message envelope with the default reply and empty usage."""
        response = post(client, wrapper, body(credentials, "Hello"))

        expected = {
            "type": "message",
            "content": [{"type": "text", "text": "You said: Hello"}],
            "model": "sonnet",
            "usage": {},
        }
        assert (200, expected) == (response.status_code, response.json())

    def test_model_is_echoed_as_sent(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The envelope names the model alias the client sent, not the resolved id."""
        response = post(client, wrapper, body(credentials, model="opus"))

        assert "opus" == response.json()["model"]

    def test_default_reply_answers_the_last_user_message(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The default reply quotes the last user message."""
        response = post(client, wrapper, body(credentials, "first", "second"))

        assert "You said: second" == response.json()["content"][0]["text"]

    def test_reply_gets_the_flattened_prompt(
        self, make_wrapper: MakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """reply() receives user text as-is, 'Assistant: ' turns, blank-line joined, no system."""
        prompts: list[str] = []

        def reply(prompt: str) -> str:
            prompts.append(prompt)
            return "ok"

        wrapper = make_wrapper(reply=reply)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"},
        ]

        post(client, wrapper, body(credentials) | {"messages": messages})

        assert ["Capital of France?\n\nAssistant: Paris.\n\nAnd Italy?"] == prompts

    @pytest.mark.parametrize(("text", "expected"), [("42", 42), ('{"a": 1}', {"a": 1})])
    def test_json_reply_is_the_raw_body(
        self,
        make_wrapper: MakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        text: str,
        expected: object,
    ) -> None:
        """A reply that is valid JSON comes back as that value, with no envelope."""
        wrapper = make_wrapper(reply=lambda _: text)

        assert expected == post(client, wrapper, body(credentials)).json()

    def test_session_id_is_ignored(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A session_id is accepted and changes nothing."""
        without = post(client, wrapper, body(credentials)).json()
        with_id = post(client, wrapper, body(credentials, session_id="conv-1")).json()

        assert without == with_id

    def test_failing_reply_callable_is_a_500(
        self, make_wrapper: MakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A reply() that raises answers 500 'Server error: ...', like any server exception."""

        def broken(prompt: str) -> str:
            raise RuntimeError("boom")

        response = post(client, make_wrapper(reply=broken), body(credentials))

        assert (500, {"detail": "Server error: RuntimeError: boom"}) == (
            response.status_code,
            response.json(),
        )

    def test_chunked_request_body_is_read(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A body sent with Transfer-Encoding: chunked is decoded like any other."""
        encoded = json.dumps(body(credentials, "Hello")).encode()

        response = client.post(
            wrapper.url + "/v1/messages",
            content=iter([encoded[:10], encoded[10:]]),
            headers={"Content-Type": "application/json"},
        )

        assert "You said: Hello" == response.json()["content"][0]["text"]

    def test_persistent_connection(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """JSON answers are HTTP/1.1 with a Content-Length and no Connection: close."""
        response = post(client, wrapper, body(credentials))

        assert ("HTTP/1.1", True, None) == (
            response.http_version,
            "Content-Length" in response.headers,
            response.headers.get("Connection"),
        )


class TestIncludeFiles:
    def test_files_and_summary(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """include_files adds the snapshot: text as text, non-UTF-8 bytes as base64, sizes."""
        wrapper.add_file("notes.md", "héllo")
        wrapper.add_file("logo.bin", b"\xff\x00")

        document = post(client, wrapper, body(credentials, include_files=True)).json()

        files = [
            {"path": "notes.md", "content": "héllo", "encoding": "text", "size": 6},
            {
                "path": "logo.bin",
                "content": base64.b64encode(b"\xff\x00").decode(),
                "encoding": "base64",
                "size": 2,
            },
        ]
        assert (files, {"total": 2, "total_size": 8}) == (
            document["files"],
            document["files_summary"],
        )

    def test_hostile_paths_are_returned_as_given(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Paths escaping the workspace come back verbatim: refusing them is the client's job."""
        wrapper.add_file("../escape.txt", "x")
        wrapper.add_file("/etc/x", "y")

        document = post(client, wrapper, body(credentials, include_files=True)).json()

        assert ["../escape.txt", "/etc/x"] == [file["path"] for file in document["files"]]

    def test_without_include_files_there_are_no_files(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Without include_files the envelope has no files keys."""
        wrapper.add_file("notes.md", "x")

        document = post(client, wrapper, body(credentials)).json()

        assert {"type", "content", "model", "usage"} == set(document)

    def test_clear_files_empties_the_snapshot(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """After clear_files() the snapshot is empty."""
        wrapper.add_file("notes.md", "x")
        wrapper.clear_files()

        document = post(client, wrapper, body(credentials, include_files=True)).json()

        assert ([], {"total": 0, "total_size": 0}) == (
            document["files"],
            document["files_summary"],
        )


class TestStream:
    EXPECTED_ORDER: tuple[str, ...] = (
        "system",
        "stream_event:message_start",
        "stream_event:content_block_start",
        "stream_event:content_block_delta",
        "stream_event:content_block_stop",
        "stream_event:message_delta",
        "stream_event:message_stop",
        "assistant",
        "result",
    )

    def test_stream_is_raw_ndjson_as_event_stream(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """stream: true answers text/event-stream whose lines are bare JSON, no data: or [DONE]."""
        response = post(client, wrapper, body(credentials, stream=True))

        lines = response.text.splitlines()
        assert (200, "text/event-stream", True) == (
            response.status_code,
            response.headers["Content-Type"].split(";")[0],
            all(line.startswith("{") for line in lines),
        )

    def test_stream_objects_come_in_order(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """init, the Anthropic events, assistant, then result, with repeated deltas collapsed."""
        objects = ndjson(post(client, wrapper, body(credentials, stream=True)))

        collapsed = [kind for i, kind in enumerate(kinds(objects)) if kinds(objects)[i - 1] != kind]
        assert list(self.EXPECTED_ORDER) == collapsed

    def test_stream_gap_sends_each_line_as_it_comes(
        self, make_wrapper: MakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """With stream_gap each NDJSON line is its own chunk, the next one that long after."""
        wrapper = make_wrapper(stream_gap=0.05)
        url = wrapper.url + "/v1/messages"
        with client.stream("POST", url, json=body(credentials, stream=True)) as response:
            arrivals = [(time.monotonic(), chunk) for chunk in response.iter_raw()]

        lines = [chunk for _, chunk in arrivals]
        gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(arrivals)]
        assert (True, True) == (
            all(line.count(b"\n") == 1 and line.endswith(b"\n") for line in lines),
            min(gaps) >= 0.04,
        )

    def test_text_deltas_join_to_the_reply(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The reply arrives as several text_delta pieces that join back in order."""
        objects = ndjson(post(client, wrapper, body(credentials, "one two three", stream=True)))

        deltas = [
            obj["event"]["delta"]["text"]
            for obj in objects
            if obj["type"] == "stream_event" and obj["event"]["type"] == "content_block_delta"
        ]
        assert (True, "You said: one two three") == (len(deltas) > 1, "".join(deltas))

    def test_result_ends_the_stream(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The last line is a successful result carrying the reply and the run's fields."""
        result = ndjson(post(client, wrapper, body(credentials, "Hi", stream=True)))[-1]

        expected_keys = {"session_id", "duration_ms", "duration_api_ms", "total_cost_usd", "usage"}
        assert ("success", False, "You said: Hi", 1, True) == (
            result["subtype"],
            result["is_error"],
            result["result"],
            result["num_turns"],
            expected_keys <= set(result),
        )

    def test_init_names_the_resolved_model(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """system/init carries the CLI's model id, no tools and no MCP servers."""
        init = ndjson(post(client, wrapper, body(credentials, stream=True, model="haiku")))[0]

        assert ("init", "claude-3-5-haiku-20241022", [], []) == (
            init["subtype"],
            init["model"],
            init["tools"],
            init["mcp_servers"],
        )

    def test_thinking_block_comes_first(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """With thinking: true, a thinking block of thinking_deltas precedes the text block."""
        objects = ndjson(post(client, wrapper, body(credentials, stream=True, thinking=True)))

        blocks = [
            (obj["event"]["index"], obj["event"]["content_block"]["type"])
            for obj in objects
            if obj["type"] == "stream_event" and obj["event"]["type"] == "content_block_start"
        ]
        first_delta = next(
            obj["event"]["delta"]["type"]
            for obj in objects
            if obj["type"] == "stream_event" and obj["event"]["type"] == "content_block_delta"
        )
        assert ([(0, "thinking"), (1, "text")], "thinking_delta") == (blocks, first_delta)

    def test_assistant_message_is_complete(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The assistant object holds the full Anthropic message with the reply text."""
        objects = ndjson(post(client, wrapper, body(credentials, "Hi", stream=True)))

        message = next(obj for obj in objects if obj["type"] == "assistant")["message"]
        assert ("assistant", [{"type": "text", "text": "You said: Hi"}]) == (
            message["role"],
            message["content"],
        )

    def test_include_files_is_ignored_on_stream(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """stream: true with include_files: no file objects appear."""
        wrapper.add_file("notes.md", "x")

        objects = ndjson(post(client, wrapper, body(credentials, stream=True, include_files=True)))

        assert list(self.EXPECTED_ORDER) == sorted(
            set(kinds(objects)), key=self.EXPECTED_ORDER.index
        )


class TestKeepalive:
    def test_sse_events_end_with_done(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Keepalive answers SSE: data: lines of the same objects, result, then [DONE]."""
        response = post(client, wrapper, body(credentials), "/v1/messages/keepalive")

        events = sse(response)
        objects = [json.loads(data) for data in events[:-1]]
        assert ("text/event-stream", "[DONE]", "system", "result") == (
            response.headers["Content-Type"].split(";")[0],
            events[-1],
            objects[0]["type"],
            objects[-1]["type"],
        )

    def test_every_event_is_data_prefixed(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Every SSE block is one data: line."""
        response = post(client, wrapper, body(credentials), "/v1/messages/keepalive")

        blocks = response.text.split("\n\n")[:-1]
        assert [] == [block for block in blocks if not block.startswith("data: ")]

    def test_include_files_adds_file_events_before_result(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """include_files adds file_created per file and one files_batch, then the result."""
        wrapper.add_file("a.txt", "alpha")
        wrapper.add_file("b.txt", "beta")
        document = body(credentials, include_files=True)

        events = sse(post(client, wrapper, document, "/v1/messages/keepalive"))

        types = [json.loads(data)["type"] for data in events[-5:-1]]
        assert ["file_created", "file_created", "files_batch", "result"] == types

    def test_file_created_carries_hash_and_size(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A file_created event has path, content, encoding, hash, size and timestamp."""
        wrapper.add_file("a.txt", "alpha")
        document = body(credentials, include_files=True)

        events = [
            json.loads(d)
            for d in sse(post(client, wrapper, document, "/v1/messages/keepalive"))[:-1]
        ]

        created = next(event for event in events if event["type"] == "file_created")
        assert (
            {"type", "path", "content", "encoding", "hash", "size", "timestamp"},
            ("a.txt", "alpha", "text", 5),
        ) == (
            set(created),
            (created["path"], created["content"], created["encoding"], created["size"]),
        )

    def test_hang_after_result_leaves_the_stream_open_without_done(
        self, make_wrapper: MakeWrapper, credentials: Credentials
    ) -> None:
        """hang_after_result: the keepalive stream stops after its result, sends no [DONE] and
        never ends, as the real endpoint's can; reading on waits for the read timeout."""
        wrapper = make_wrapper(hang_after_result=True)
        lines: list[str] = []
        with (
            httpx.Client(timeout=httpx.Timeout(5.0, read=0.5)) as http,
            http.stream(
                "POST", wrapper.url + "/v1/messages/keepalive", json=body(credentials)
            ) as response,
            pytest.raises(httpx.ReadTimeout),
        ):
            lines.extend(line for line in response.iter_lines() if line)
        assert ("result", False) == (
            json.loads(lines[-1].removeprefix("data: "))["type"],
            "data: [DONE]" in lines,
        )

    def test_auth_failure_is_in_band(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A bad token on keepalive: init, a synthetic assistant, an is_error result, [DONE]."""
        document = body(credentials)
        document["oauth_credentials"]["access_token"] = "sk-ant-oat01-forged"

        response = post(client, wrapper, document, "/v1/messages/keepalive")

        events = sse(response)
        objects = [json.loads(data) for data in events[:-1]]
        assert (200, ["system", "assistant", "result"], True, FakeWrapper.INVALID_API_KEY) == (
            response.status_code,
            [obj["type"] for obj in objects],
            objects[-1]["is_error"],
            objects[-1]["result"],
        )
        assert "[DONE]" == events[-1]


class TestSelfRefresh:
    def test_inside_the_window_the_refresh_token_is_consumed(
        self,
        make_wrapper: MakeWrapper,
        client: httpx.Client,
        fake: FakeProvider,
    ) -> None:
        """A token expiring in 4 minutes: the CLI rotates the client's refresh token."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=4 * 60)

        response = post(client, wrapper, body(credentials))

        state = fake.refresh_token_state(credentials.refresh_token)
        assert (200, "message", "used") == (response.status_code, response.json()["type"], state)

    def test_outside_the_window_nothing_is_consumed(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """A token expiring in 6 minutes leaves the refresh token current."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=6 * 60)

        post(client, wrapper, body(credentials))

        assert "current" == fake.refresh_token_state(credentials.refresh_token)

    def test_exactly_five_minutes_is_inside(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """expires_at - 5 min == now already triggers the CLI's refresh."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=5 * 60)

        post(client, wrapper, body(credentials))

        assert "used" == fake.refresh_token_state(credentials.refresh_token)

    def test_off_by_default(
        self, wrapper: FakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """Without self_refresh a token near expiry is only checked, never refreshed."""
        credentials = fake.issue(expires_in=60)

        post(client, wrapper, body(credentials))

        assert "current" == fake.refresh_token_state(credentials.refresh_token)

    def test_new_tokens_are_never_returned(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """The rotated tokens appear nowhere in the answer."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=60)

        text = post(client, wrapper, body(credentials, stream=True)).text

        family = fake.family_of(credentials)
        assert family is not None
        current = fake.current_credentials(family)
        leaked = {current.access_token.get_secret_value(), current.refresh_token.get_secret_value()}
        assert set() == {token for token in leaked if token in text}

    def test_expired_access_token_succeeds_by_refreshing(
        self,
        make_wrapper: MakeWrapper,
        client: httpx.Client,
        fake: FakeProvider,
        clock: FakeClock,
    ) -> None:
        """Even an expired access token works while the refresh token is current."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue()
        clock.advance(EIGHT_HOURS + 60)

        response = post(client, wrapper, body(credentials))

        assert "message" == response.json()["type"]

    def test_failed_rotation_with_a_valid_token_proceeds(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """A dead refresh token and a still-valid access token: a normal answer."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=60)
        fake.rotate(credentials)

        response = post(client, wrapper, body(credentials))

        assert ("message", False) == (response.json()["type"], wrapper.calls[0].self_refreshed)

    def test_failed_rotation_with_an_expired_token_is_the_auth_error(
        self,
        make_wrapper: MakeWrapper,
        client: httpx.Client,
        fake: FakeProvider,
        clock: FakeClock,
    ) -> None:
        """A dead refresh token and an expired access token: the expiry cli_error."""
        wrapper = make_wrapper(self_refresh=True)
        credentials = fake.issue(expires_in=60)
        fake.rotate(credentials)
        clock.advance(120)

        response = post(client, wrapper, body(credentials))

        assert cli_error(FakeWrapper.TOKEN_EXPIRED) == response.json()

    def test_self_refreshes_are_counted(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """self_refresh_count counts only the requests that consumed a refresh token."""
        wrapper = make_wrapper(self_refresh=True)
        post(client, wrapper, body(fake.issue(expires_in=60)))
        post(client, wrapper, body(fake.issue()))

        assert (1, [True, False]) == (
            wrapper.self_refresh_count,
            [call.self_refreshed for call in wrapper.calls],
        )

    def test_the_provider_logs_the_cli_refresh(
        self, make_wrapper: MakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """The CLI's refresh shows at the provider as one successful rotation."""
        wrapper = make_wrapper(self_refresh=True)

        post(client, wrapper, body(fake.issue(expires_in=60)))

        assert 1 == fake.refresh_count


class TestCallLog:
    def test_call_records_the_request(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        clock: FakeClock,
    ) -> None:
        """A call logs when, where, the model, stream, outcome and the sent expiry."""
        post(client, wrapper, body(credentials, model="opus"))

        expected = WrapperCall(
            at=clock.now(),
            path="/v1/messages",
            outcome="ok",
            model="opus",
            stream=False,
            expires_at=credentials.expires_at,
            access_token=credentials.access_token,
            refresh_token=credentials.refresh_token,
        )
        assert [expected] == wrapper.calls

    def test_expires_in_is_the_margin_left(
        self, wrapper: FakeWrapper, client: httpx.Client, fake: FakeProvider
    ) -> None:
        """expires_in = expires_at - at, to assert no token was sent too close to expiry."""
        post(client, wrapper, body(fake.issue(expires_in=900)))

        assert timedelta(minutes=15) == wrapper.calls[0].expires_in

    def test_outcomes_name_what_happened(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """422s, auth failures and keepalive streams are logged with their outcome."""
        forged = body(credentials)
        forged["oauth_credentials"]["access_token"] = "sk-ant-oat01-forged"
        post(client, wrapper, {"messages": []})
        post(client, wrapper, forged)
        post(client, wrapper, body(credentials), "/v1/messages/keepalive")

        assert [
            ("/v1/messages", "invalid_request", False),
            ("/v1/messages", "invalid_api_key", False),
            ("/v1/messages/keepalive", "ok", True),
        ] == [(call.path, call.outcome, call.stream) for call in wrapper.calls]

    def test_reset_log_forgets_calls(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """reset_log() empties calls."""
        post(client, wrapper, body(credentials))

        wrapper.reset_log()

        assert [] == wrapper.calls

    def test_calls_is_a_snapshot(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Mutating the returned list does not change the log."""
        post(client, wrapper, body(credentials))

        wrapper.calls.clear()

        assert 1 == len(wrapper.calls)


class TestFaults:
    def test_status_fault_answers_fastapi_detail(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """status(500, detail) answers 500 {"detail": detail}."""
        wrapper.fail_next(WrapperFault.status(500, "Server error: disk full"))

        response = post(client, wrapper, body(credentials))

        assert (500, {"detail": "Server error: disk full"}) == (
            response.status_code,
            response.json(),
        )

    def test_unauthorized_fault(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """status(401) answers 401 with a detail, by default the wrapper's own text."""
        wrapper.fail_next(WrapperFault.status(401))

        response = post(client, wrapper, body(credentials))

        assert (401, {"detail": "Invalid OAuth token format"}) == (
            response.status_code,
            response.json(),
        )

    def test_status_fault_with_a_raw_body(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """status(code, body=...) sends that body verbatim, for a proxy's HTML page."""
        wrapper.fail_next(WrapperFault.status(503, body="<html>Service Unavailable</html>"))

        response = post(client, wrapper, body(credentials))

        assert (503, "<html>Service Unavailable</html>", "text/html") == (
            response.status_code,
            response.text,
            response.headers["Content-Type"].split(";")[0],
        )

    def test_cli_timeout_echoes_the_tokens(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """The timeout detail holds the sent access and refresh tokens, as the real one does."""
        wrapper.fail_next(WrapperFault.cli_timeout())

        response = post(client, wrapper, body(credentials))

        text = response.json()["detail"]
        assert (500, True, True, True, True) == (
            response.status_code,
            text.startswith("Server error: Command '['claude', "),
            text.endswith("]' timed out after 180 seconds"),
            credentials.access_token.get_secret_value() in text,
            credentials.refresh_token.get_secret_value() in text,
        )

    def test_cli_timeout_tokens_stay_out_of_reprs(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """After a timeout fault, neither repr(wrapper) nor the call log shows a token."""
        wrapper.fail_next(WrapperFault.cli_timeout())
        post(client, wrapper, body(credentials))

        text = repr(wrapper) + repr(wrapper.calls) + repr(wrapper.calls[0].access_token)

        tokens = (credentials.access_token, credentials.refresh_token)
        assert (True, "fault:cli_timeout") == (
            all(token.get_secret_value() not in text for token in tokens) and "sk-ant-" not in text,
            wrapper.calls[0].outcome,
        )

    def test_nothing_reaches_stderr(
        self,
        wrapper: FakeWrapper,
        client: httpx.Client,
        credentials: Credentials,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        """Requests, faults and errors print nothing: no access log, no tracebacks."""
        wrapper.fail_next(WrapperFault.cli_timeout())
        post(client, wrapper, body(credentials))
        post(client, wrapper, {"messages": 1})

        assert ("", "") == capfd.readouterr()

    def test_cli_error_fault_is_http_200(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """cli_error(text) answers 200 with the cli_error body, such as a quota message."""
        wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))

        response = post(client, wrapper, body(credentials, model="opus"))

        expected = cli_error("Opus weekly limit reached ∙ resets Nov 10, 5pm")
        assert (200, expected) == (response.status_code, response.json())

    def test_cli_error_fault_on_keepalive_is_in_band(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """On keepalive a cli_error fault ends in an is_error result carrying the text."""
        wrapper.fail_next(WrapperFault.cli_error("quota"))

        events = sse(post(client, wrapper, body(credentials), "/v1/messages/keepalive"))

        result = json.loads(events[-2])
        assert ("result", True, "quota", "[DONE]") == (
            result["type"],
            result["is_error"],
            result["result"],
            events[-1],
        )

    def test_delay_fault_outlasts_a_short_client_timeout(
        self, wrapper: FakeWrapper, credentials: Credentials
    ) -> None:
        """delay(seconds) holds the answer, so an impatient client times out."""
        wrapper.fail_next(WrapperFault.delay(2.0))

        with httpx.Client(timeout=0.05) as impatient, pytest.raises(httpx.ReadTimeout):
            post(impatient, wrapper, body(credentials))

    def test_delay_fault_then_answers_normally(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """After the delay the request is handled as usual; the log names the fault."""
        wrapper.fail_next(WrapperFault.delay(0.01))

        response = post(client, wrapper, body(credentials))

        call = wrapper.calls[0]
        assert ("message", "ok", "fault:delay") == (
            response.json()["type"],
            call.outcome,
            call.fault,
        )

    def test_stream_error_fault_cuts_the_ndjson(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """stream_error breaks the stream after N deltas with an error object and no result."""
        wrapper.fail_next(WrapperFault.stream_error("overloaded", after_deltas=2))

        objects = ndjson(post(client, wrapper, body(credentials, "a b c d", stream=True)))

        deltas = [kind for kind in kinds(objects) if kind.endswith("content_block_delta")]
        assert (2, cli_error("overloaded", "stream_error"), False) == (
            len(deltas),
            objects[-1],
            any(obj["type"] == "result" for obj in objects),
        )

    def test_stream_error_fault_on_keepalive(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """On keepalive the in-band stream_error is followed by [DONE]."""
        wrapper.fail_next(WrapperFault.stream_error("overloaded", after_deltas=1))

        events = sse(post(client, wrapper, body(credentials), "/v1/messages/keepalive"))

        assert (json.dumps(cli_error("overloaded", "stream_error")), "[DONE]") == (
            events[-2],
            events[-1],
        )

    def test_stream_error_fault_without_stream_is_a_cli_error(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A non-streaming request taking a stream_error fault gets its message as cli_error."""
        wrapper.fail_next(WrapperFault.stream_error("overloaded"))

        assert cli_error("overloaded") == post(client, wrapper, body(credentials)).json()

    def test_faults_are_taken_in_order(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """Each request takes the next fault; once they run out, requests succeed."""
        wrapper.fail_next(WrapperFault.status(502), WrapperFault.cli_error("x"))

        codes = [post(client, wrapper, body(credentials)).status_code for _ in range(3)]

        assert ([502, 200, 200], ["fault:502", "fault:cli_error", "ok"]) == (
            codes,
            [call.outcome for call in wrapper.calls],
        )

    def test_invalid_requests_take_no_fault(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """A 422 is FastAPI's answer before the handler: the fault waits for a valid request."""
        wrapper.fail_next(WrapperFault.status(500))

        post(client, wrapper, {"messages": []})

        assert 1 == wrapper.pending_faults

    def test_clear_faults_drops_the_queue(self, wrapper: FakeWrapper) -> None:
        """clear_faults() returns how many it dropped and leaves none."""
        wrapper.fail_next(WrapperFault.status(500), WrapperFault.cli_timeout())

        assert (2, 0) == (wrapper.clear_faults(), wrapper.pending_faults)

    def test_fail_next_refuses_other_objects(self, wrapper: FakeWrapper) -> None:
        """fail_next() takes WrapperFault instances only."""
        with pytest.raises(TypeError, match="WrapperFault"):
            wrapper.fail_next(500)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        "build",
        [
            lambda: WrapperFault.status(99),
            lambda: WrapperFault.delay(-1),
            lambda: WrapperFault.stream_error(after_deltas=-1),
        ],
    )
    def test_bad_fault_arguments_are_refused(self, build: Callable[[], WrapperFault]) -> None:
        """Out-of-range codes, delays and delta counts raise ValueError."""
        with pytest.raises(ValueError, match="must be"):
            build()


class TestReprs:
    def test_wrapper_repr_shows_url_and_counters(
        self, wrapper: FakeWrapper, client: httpx.Client, credentials: Credentials
    ) -> None:
        """repr(FakeWrapper) shows the URL and counters and no token."""
        post(client, wrapper, body(credentials))

        text = repr(wrapper)

        assert (True, True, False) == (wrapper.url in text, "calls=1" in text, "sk-ant-" in text)

    def test_call_repr_hides_tokens(self) -> None:
        """repr(WrapperCall) never shows the tokens but does show the outcome."""
        call = WrapperCall(
            at=datetime(2026, 1, 1, tzinfo=UTC),
            path="/v1/messages",
            outcome="ok",
            access_token=Secret("sk-ant-oat01-x"),
            refresh_token=Secret("sk-ant-ort01-y"),
        )

        assert (False, True) == ("sk-ant-" in repr(call), "outcome='ok'" in repr(call))


class TestLifecycle:
    def test_clock_defaults_to_the_providers(self, fake: FakeProvider) -> None:
        """Without a clock the wrapper reads the provider's, so both judge expiry alike."""
        assert fake.clock is FakeWrapper(fake).clock

    def test_url_before_start_raises(self, fake: FakeProvider) -> None:
        """url raises RuntimeError naming the fix when the server is not running."""
        with pytest.raises(RuntimeError, match=r"call start\(\)"):
            _ = FakeWrapper(fake).url

    def test_negative_latency_is_refused(self, fake: FakeProvider) -> None:
        """latency must be a number of seconds >= 0."""
        with pytest.raises(ValueError, match="latency"):
            FakeWrapper(fake, latency=-1)

    def test_negative_stream_gap_is_refused(self, fake: FakeProvider) -> None:
        """stream_gap must be a number of seconds >= 0."""
        with pytest.raises(ValueError, match="stream_gap"):
            FakeWrapper(fake, stream_gap=-0.5)

    def test_provider_must_be_a_fake_provider(self) -> None:
        """The wrapper judges tokens with a FakeProvider and refuses anything else."""
        with pytest.raises(TypeError, match="FakeProvider"):
            FakeWrapper(object())  # type: ignore[arg-type]

    def test_stop_closes_the_port(self, fake: FakeProvider) -> None:
        """After stop() nothing listens on the port any more."""
        wrapper = FakeWrapper(fake).start()
        port = int(wrapper.url.rsplit(":", 1)[1])

        wrapper.stop()

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_stop_closes_idle_keep_alive_connections(
        self, fake: FakeProvider, credentials: Credentials
    ) -> None:
        """A pooled keep-alive connection is not served after stop()."""
        with httpx.Client(timeout=1.0) as http:
            with FakeWrapper(fake) as wrapper:
                url = wrapper.url + "/v1/messages"
                http.post(url, json=body(credentials))
            with pytest.raises(httpx.TransportError):
                http.post(url, json=body(credentials))

    def test_stop_is_idempotent(self, fake: FakeProvider) -> None:
        """Calling stop() twice, or before start(), is harmless."""
        wrapper = FakeWrapper(fake)
        wrapper.stop()
        wrapper.start()
        wrapper.stop()
        wrapper.stop()

        assert "url=None" in repr(wrapper)

    def test_stop_drops_held_requests(self, fake: FakeProvider, credentials: Credentials) -> None:
        """stop() returns promptly even while a delay fault holds a request."""
        wrapper = FakeWrapper(fake).start()
        wrapper.fail_next(WrapperFault.delay(30.0))
        with httpx.Client(timeout=0.05) as impatient, pytest.raises(httpx.ReadTimeout):
            post(impatient, wrapper, body(credentials))

        wrapper.stop()

        assert "url=None" in repr(wrapper)


# No server runs for these: the host is never looked up, and the wrapper is never started.
IN_PROCESS_URL = "https://wrapper.test"
HELLO = [{"role": "user", "content": "Hello"}]


class TestInProcess:
    @pytest.fixture
    def unstarted(self, fake: FakeProvider) -> FakeWrapper:
        return FakeWrapper(fake)

    @pytest.fixture
    def mock_client(
        self, manager: TokenManager, alice: Credentials, unstarted: FakeWrapper
    ) -> Iterator[WrapperClient]:
        transport = httpx.MockTransport(unstarted.handler)
        with (
            httpx.Client(transport=transport) as http,
            WrapperClient(manager, base_url=IN_PROCESS_URL, http=http) as wrapper_client,
        ):
            yield wrapper_client

    def test_client_call_through_the_handler(
        self, mock_client: WrapperClient, unstarted: FakeWrapper
    ) -> None:
        """A WrapperClient on a MockTransport gets the reply, and the fake logs the call."""
        message = mock_client.messages.create("alice", HELLO)

        assert ("You said: Hello", ["ok"]) == (message.text, outcomes(unstarted))

    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_client_stream_through_the_handler(
        self, mock_client: WrapperClient, keepalive: bool
    ) -> None:
        """A stream over a MockTransport yields the deltas and ends with the result."""
        with mock_client.messages.stream("alice", HELLO, keepalive=keepalive) as stream:
            text = "".join(stream.text_deltas())

        result = stream.result.result if stream.result else None
        assert ("You said: Hello", "You said: Hello") == (text, result)

    @pytest.mark.anyio
    async def test_async_client_stream_through_the_handler(
        self, store: MemoryStore, fake: FakeProvider, clock: FakeClock, unstarted: FakeWrapper
    ) -> None:
        """An async client on a MockTransport reads a keepalive stream from the same handler."""
        async with (
            AsyncTokenManager(store, fake.provider(), clock=clock) as tokens,
            httpx.AsyncClient(transport=httpx.MockTransport(unstarted.handler)) as http,
            AsyncWrapperClient(tokens, base_url=IN_PROCESS_URL, http=http) as wrapper_client,
        ):
            await tokens.put("alice", fake.issue())
            async with wrapper_client.messages.stream("alice", HELLO, keepalive=True) as stream:
                text = "".join([delta async for delta in stream.text_deltas()])

        assert "You said: Hello" == text

    def test_answers_are_the_servers(self, unstarted: FakeWrapper) -> None:
        """In-process, a wrong method gets the server's 405 with its Allow header."""
        with httpx.Client(transport=httpx.MockTransport(unstarted.handler)) as http:
            response = http.get(IN_PROCESS_URL + "/v1/messages")

        assert (405, "POST") == (response.status_code, response.headers["Allow"])

    def test_delay_past_the_client_timeout_raises_read_timeout(
        self, unstarted: FakeWrapper, credentials: Credentials
    ) -> None:
        """A delay past the client's read timeout raises ReadTimeout; the call is still logged."""
        unstarted.fail_next(WrapperFault.delay(30.0))
        transport = httpx.MockTransport(unstarted.handler)
        with (
            httpx.Client(transport=transport, timeout=0.05) as http,
            pytest.raises(httpx.ReadTimeout),
        ):
            http.post(IN_PROCESS_URL + "/v1/messages", json=body(credentials))

        assert [("ok", "fault:delay")] == [(c.outcome, c.fault) for c in unstarted.calls]
