"""WrapperClient and AsyncWrapperClient against FakeWrapper and FakeProvider over loopback HTTP."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from credkeeper import (
    AsyncTokenManager,
    AsyncWrapperClient,
    AuthFailed,
    ConfigurationError,
    Credentials,
    InvalidRequest,
    MemoryStore,
    ReauthRequired,
    TokenManager,
    UnsafeFilePath,
    UsageLimitReached,
    WrapperClient,
    WrapperError,
    WrapperUnavailable,
)
from credkeeper._wrapper import DEFAULT_WRAPPER_URL
from credkeeper.testing import FakeClock, FakeProvider, FakeWrapper, WrapperFault
from credkeeper.wrapper import ResultEvent, StreamEvent, SystemEvent

from .conftest import KEY

HELLO = [{"role": "user", "content": "hello"}]
REPLY = "You said: hello"


def outcomes(wrapper: FakeWrapper) -> list[str]:
    return [call.outcome for call in wrapper.calls]


class TestCreate:
    def test_reply(self, client: WrapperClient, alice: Credentials) -> None:
        """A call with valid credentials returns the reply's text and model."""
        message = client.messages.create(KEY, HELLO)

        assert (REPLY, "sonnet") == (message.text, message.model)

    def test_valid_token_sent_without_refresh(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A token valid beyond the leeway is sent as stored; the provider is not called."""
        client.messages.create(KEY, HELLO)

        assert (0, alice.access_token) == (fake.refresh_count, wrapper.calls[0].access_token)

    def test_due_token_refreshed_before_the_call(
        self,
        client: WrapperClient,
        manager: TokenManager,
        fake: FakeProvider,
        wrapper: FakeWrapper,
    ) -> None:
        """A token within the leeway is refreshed once, and the new one is what gets sent."""
        old = fake.issue(expires_in=600)
        manager.put(KEY, old)

        client.messages.create(KEY, HELLO)

        sent = wrapper.calls[0].access_token
        assert (1, ["ok"], False, "valid") == (
            fake.refresh_count,
            outcomes(wrapper),
            sent == old.access_token,
            fake.access_token_state(sent) if sent else None,
        )

    def test_revoked_token_refreshed_and_retried(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A token revoked at the provider is refused, refreshed once, and the retry works."""
        fake.revoke_access_token(alice)

        message = client.messages.create(KEY, HELLO)

        assert (REPLY, ["token_revoked", "ok"], 1) == (
            message.text,
            outcomes(wrapper),
            fake.refresh_count,
        )

    def test_early_expiry_refreshed_and_retried(
        self,
        client: WrapperClient,
        manager: TokenManager,
        fake: FakeProvider,
        clock: FakeClock,
        wrapper: FakeWrapper,
    ) -> None:
        """A token the provider expired before its stored expires_at is refreshed and retried."""
        issued = fake.issue(expires_in=-60)
        manager.put(
            KEY,
            Credentials(
                access_token=issued.access_token,
                refresh_token=issued.refresh_token,
                expires_at=clock.now() + timedelta(hours=8),
            ),
        )

        client.messages.create(KEY, HELLO)

        assert (["token_expired", "ok"], 1) == (outcomes(wrapper), fake.refresh_count)

    def test_http_401_refreshed_and_retried(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """HTTP 401 counts as an auth failure too."""
        wrapper.fail_next(WrapperFault.status(401))

        client.messages.create(KEY, HELLO)

        assert (["fault:401", "ok"], 1) == (outcomes(wrapper), fake.refresh_count)

    def test_second_refusal_raises_auth_failed(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A refusal after the refresh raises AuthFailed: one refresh, two attempts, no loop."""
        wrapper.fail_next(
            WrapperFault.cli_error(FakeWrapper.INVALID_API_KEY),
            WrapperFault.cli_error(FakeWrapper.INVALID_API_KEY),
        )

        with pytest.raises(AuthFailed) as error:
            client.messages.create(KEY, HELLO)

        assert (KEY, 1, 2) == (error.value.key, fake.refresh_count, len(wrapper.calls))

    def test_peer_refresh_adopted_without_provider_call(
        self,
        client: WrapperClient,
        alice: Credentials,
        store: MemoryStore,
        fake: FakeProvider,
        clock: FakeClock,
        wrapper: FakeWrapper,
        tmp_path: Path,
    ) -> None:
        """When another worker already refreshed, its tokens are used; no second refresh."""
        client.messages.create(KEY, HELLO)  # the client's manager now caches alice
        with TokenManager(store, fake.provider(), journal=tmp_path / "j2", clock=clock) as peer:
            peer.refresh(KEY)
        fake.revoke_access_token(alice)

        client.messages.create(KEY, HELLO)

        assert (1, ["ok", "token_revoked", "ok"]) == (fake.refresh_count, outcomes(wrapper))

    def test_usage_limit_never_refreshes(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A weekly limit raises UsageLimitReached with no refresh and no retry."""
        wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))

        with pytest.raises(UsageLimitReached, match="weekly limit"):
            client.messages.create(KEY, HELLO)

        assert (0, 1) == (fake.refresh_count, len(wrapper.calls))

    def test_reauth_required_when_refresh_token_is_dead(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider
    ) -> None:
        """A refusal whose refresh meets a revoked family raises ReauthRequired."""
        fake.revoke(alice)

        with pytest.raises(ReauthRequired):
            client.messages.create(KEY, HELLO)

    def test_server_error_redacted(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A CLI timeout 500 that echoes the tokens raises WrapperUnavailable without them."""
        wrapper.fail_next(WrapperFault.cli_timeout())

        with pytest.raises(WrapperUnavailable) as error:
            client.messages.create(KEY, HELLO)

        shown = f"{error.value} {error.value.excerpt} {error.value!r}"
        assert (500, True, []) == (
            error.value.status,
            "Server error" in shown,
            [token for token in fake.all_tokens() if token in shown],
        )

    def test_invalid_request_sends_nothing(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper
    ) -> None:
        """A request the wrapper would refuse is refused before the network."""
        with pytest.raises(InvalidRequest, match=r"messages\.0\.content"):
            client.messages.create(KEY, [{"role": "user", "content": [{"type": "text"}]}])

        assert [] == wrapper.calls

    def test_options_reach_the_wrapper(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper
    ) -> None:
        """model, thinking, fallback_model and mcp_servers pass the wrapper's validation."""
        message = client.messages.create(
            KEY,
            HELLO,
            model="opus",
            thinking=True,
            fallback_model="sonnet",
            session_id="ignored",
            mcp_servers={"remote": {"url": "https://mcp.example/mcp", "transport": "sse"}},
        )

        assert ("opus", ["ok"]) == (message.model, outcomes(wrapper))

    def test_unknown_option_sends_nothing(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper
    ) -> None:
        """A misspelt option is a TypeError naming it, raised before the network."""
        with pytest.raises(TypeError, match="'modle'"):
            client.messages.create(KEY, HELLO, modle="opus")  # type: ignore[call-arg]

        assert [] == wrapper.calls

    def test_keepalive_is_for_streams_only(self, client: WrapperClient, alice: Credentials) -> None:
        """create() takes no keepalive: it is an option of stream() alone."""
        with pytest.raises(TypeError, match="'keepalive'"):
            client.messages.create(KEY, HELLO, keepalive=True)  # type: ignore[call-arg]

    def test_unreachable_wrapper(self, manager: TokenManager, alice: Credentials) -> None:
        """A wrapper that is not listening raises WrapperUnavailable, hiding URL passwords."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with (
            WrapperClient(manager, base_url=f"http://svc:hunter2@127.0.0.1:{port}") as client,
            pytest.raises(WrapperUnavailable, match="could not reach") as error,
        ):
            client.messages.create(KEY, HELLO)

        assert "hunter2" not in str(error.value)

    def test_timeout(self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper) -> None:
        """A call that outlasts its timeout raises WrapperUnavailable."""
        wrapper.fail_next(WrapperFault.delay(1.0))

        with pytest.raises(WrapperUnavailable, match="in time"):
            client.messages.create(KEY, HELLO, timeout=0.2)

    def test_unknown_subscription_type_is_left_out(
        self, client: WrapperClient, manager: TokenManager, fake: FakeProvider
    ) -> None:
        """Credentials without a subscription type pass the wrapper's model (null would not)."""
        manager.put(KEY, fake.issue(subscription_type=None))

        assert REPLY == client.messages.create(KEY, HELLO).text

    def test_health(self, client: WrapperClient) -> None:
        """health() reports the wrapper's status and version."""
        health = client.health()

        assert ("healthy", "v36-files-watcher") == (health.status, health.version)

    @pytest.mark.parametrize(
        "url", ["http://wrapper.example.com", "http://10.0.0.1:8000", "http://127.0.0.2"]
    )
    def test_plain_http_elsewhere_refused(self, manager: TokenManager, url: str) -> None:
        """Plain http to a host other than loopback is refused: the tokens would travel in clear."""
        with pytest.raises(ConfigurationError, match=r"base_url must use https \(plain http"):
            WrapperClient(manager, base_url=url)

    @pytest.mark.parametrize(
        "url",
        ["http://127.0.0.1:8000", "http://localhost", "http://[::1]:9000/", "https://w.example"],
    )
    def test_https_or_loopback_accepted(self, manager: TokenManager, url: str) -> None:
        """https anywhere, and plain http on loopback, are accepted."""
        with WrapperClient(manager, base_url=url) as client:
            assert url.rstrip("/") == client.base_url

    @pytest.mark.parametrize("url", ["", "wrapper.example.com", "ftp://w.example", "https://"])
    def test_not_a_url_refused(self, manager: TokenManager, url: str) -> None:
        """A base_url that is not an absolute http(s) URL is refused, naming the public one."""
        with pytest.raises(ConfigurationError, match=r"base_url.*public wrapper"):
            WrapperClient(manager, base_url=url)

    def test_default_is_the_variable_then_the_public_wrapper(
        self, manager: TokenManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without base_url, CREDKEEPER_WRAPPER_URL names the wrapper, as for the command line;
        unset or empty, the public wrapper."""
        found = []
        for value in ("http://127.0.0.1:8000/", ""):
            monkeypatch.setenv("CREDKEEPER_WRAPPER_URL", value)
            with WrapperClient(manager) as client:
                found.append(client.base_url)

        assert ["http://127.0.0.1:8000", DEFAULT_WRAPPER_URL] == found

    def test_base_url_wins_over_the_variable(
        self, manager: TokenManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A base_url given replaces the variable."""
        monkeypatch.setenv("CREDKEEPER_WRAPPER_URL", "http://127.0.0.1:8000")

        with WrapperClient(manager, base_url="https://w.example") as client:
            assert "https://w.example" == client.base_url

    def test_a_bad_variable_is_named(
        self, manager: TokenManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A variable naming plain http to another host is refused, naming the variable."""
        monkeypatch.setenv("CREDKEEPER_WRAPPER_URL", "http://wrapper.example.com")

        with pytest.raises(ConfigurationError, match=r"variable CREDKEEPER_WRAPPER_URL must use"):
            WrapperClient(manager)

    def test_a_variable_httpx_cannot_use_is_named(
        self, manager: TokenManager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A variable httpx cannot parse is refused naming the variable, not base_url."""
        monkeypatch.setenv("CREDKEEPER_WRAPPER_URL", "https://wrapper.example:8x0")

        with pytest.raises(ConfigurationError, match=r"variable CREDKEEPER_WRAPPER_URL is not a"):
            WrapperClient(manager)

    def test_url_httpx_cannot_use_refused(self, manager: TokenManager) -> None:
        """A base_url httpx cannot parse is refused when the client is made, not at each call."""
        with pytest.raises(ConfigurationError, match=r"base_url is not a valid URL \(Invalid port"):
            WrapperClient(manager, base_url="https://svc:hunter2@wrapper.example:abc")

    def test_refusal_hides_url_password(self, manager: TokenManager) -> None:
        """The refusal of a plain http URL does not repeat its password."""
        with pytest.raises(ConfigurationError) as error:
            WrapperClient(manager, base_url="http://svc:hunter2@wrapper.example.com")

        assert "hunter2" not in str(error.value)

    def test_refusal_of_another_scheme_hides_url_password(self, manager: TokenManager) -> None:
        """The refusal of a URL that is not http(s) does not repeat its password either."""
        with pytest.raises(ConfigurationError) as error:
            WrapperClient(manager, base_url="ftp://svc:hunter2@wrapper.example.com")

        assert "hunter2" not in str(error.value)

    def test_wrong_manager_type(self, tmp_path: Path, fake: FakeProvider) -> None:
        """An AsyncTokenManager given to WrapperClient is a clear configuration error."""
        tokens = AsyncTokenManager(MemoryStore(), fake.provider(), journal=tmp_path)

        with pytest.raises(ConfigurationError, match="AsyncWrapperClient"):
            WrapperClient(tokens)  # type: ignore[arg-type]


class TestFiles:
    def test_files_saved(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper, tmp_path: Path
    ) -> None:
        """include_files returns the workspace; save_files writes text and binary files."""
        wrapper.add_file("notes/a.txt", "hi")
        wrapper.add_file("data.bin", b"\xff\x00\x01")

        message = client.messages.create(KEY, HELLO, include_files=True)
        message.save_files(tmp_path / "out")

        assert (b"hi", b"\xff\x00\x01") == (
            (tmp_path / "out/notes/a.txt").read_bytes(),
            (tmp_path / "out/data.bin").read_bytes(),
        )

    def test_escaping_path_rejected(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper, tmp_path: Path
    ) -> None:
        """A returned ../ path is refused and nothing is written, inside or outside."""
        wrapper.add_file("fine.txt", "ok")
        wrapper.add_file("../escape.txt", "gotcha")
        (tmp_path / "out").mkdir()

        message = client.messages.create(KEY, HELLO, include_files=True)
        with pytest.raises(UnsafeFilePath, match="escape"):
            message.save_files(tmp_path / "out")

        assert ([], False) == (
            list((tmp_path / "out").iterdir()),
            (tmp_path / "escape.txt").exists(),
        )


class TestStream:
    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_deltas_in_order_and_final_result(
        self, client: WrapperClient, alice: Credentials, keepalive: bool
    ) -> None:
        """The deltas join into the reply, init comes first and the result last."""
        with client.messages.stream(KEY, HELLO, keepalive=keepalive) as stream:
            events = list(stream)

        deltas = [e.text for e in events if isinstance(e, StreamEvent) and e.text]
        assert (True, True, REPLY, True, REPLY) == (
            isinstance(events[0], SystemEvent),
            isinstance(events[-1], ResultEvent),
            "".join(deltas),
            len(deltas) > 1,
            stream.result.result if stream.result else None,
        )

    def test_text_deltas_skip_thinking(self, client: WrapperClient, alice: Credentials) -> None:
        """text_deltas() yields the reply text only, not the thinking deltas."""
        with client.messages.stream(KEY, HELLO, thinking=True) as stream:
            events = list(stream)
        with client.messages.stream(KEY, HELLO, thinking=True) as again:
            text = "".join(again.text_deltas())

        thinking = [e for e in events if isinstance(e, StreamEvent) and e.thinking]
        assert (REPLY, True) == (text, len(thinking) > 0)

    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_auth_failure_retried_before_any_event(
        self,
        client: WrapperClient,
        alice: Credentials,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        keepalive: bool,
    ) -> None:
        """A stream refused at the start is refreshed and retried; the caller sees one stream."""
        fake.revoke_access_token(alice)

        with client.messages.stream(KEY, HELLO, keepalive=keepalive) as stream:
            events = list(stream)

        assert (["token_revoked", "ok"], 1, 1) == (
            outcomes(wrapper),
            fake.refresh_count,
            sum(isinstance(e, SystemEvent) for e in events),
        )

    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    def test_mid_stream_error_raises_after_the_deltas(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper, keepalive: bool
    ) -> None:
        """An in-band error after two deltas raises WrapperError once they are delivered."""
        wrapper.fail_next(WrapperFault.stream_error(after_deltas=2))
        received: list[str] = []

        with (
            pytest.raises(WrapperError, match="Connection error"),
            client.messages.stream(KEY, HELLO, keepalive=keepalive) as stream,
        ):
            received.extend(stream.text_deltas())

        assert 2 == len(received)

    def test_early_close_releases_the_connection(
        self, manager: TokenManager, wrapper: FakeWrapper, alice: Credentials
    ) -> None:
        """Leaving a stream early returns its connection: a one-connection pool serves the next."""
        limits = httpx.Limits(max_connections=1)
        with (
            httpx.Client(limits=limits, timeout=httpx.Timeout(5.0, pool=1.0)) as http,
            WrapperClient(manager, base_url=wrapper.url, http=http) as client,
        ):
            for _ in range(3):
                with client.messages.stream(KEY, HELLO, keepalive=True) as stream:
                    next(stream)

            assert REPLY == client.messages.create(KEY, HELLO).text

    def test_a_stream_read_to_its_result_keeps_its_connection(
        self, manager: TokenManager, wrapper: FakeWrapper, alice: Credentials
    ) -> None:
        """A /v1/messages stream (sent in one piece) read to its result is read to its end: the
        next call reuses the connection."""
        connections: list[object] = []

        def note(response: httpx.Response) -> None:
            connections.append(response.extensions["network_stream"])

        with (
            httpx.Client(event_hooks={"response": [note]}) as http,
            WrapperClient(manager, base_url=wrapper.url, http=http) as client,
        ):
            for _ in range(3):
                with client.messages.stream(KEY, HELLO) as stream:
                    list(stream)

        assert 1 == len({id(connection) for connection in connections})

    @pytest.mark.parametrize("stop", ["at-the-end", "break-at-result"])
    def test_a_keepalive_stream_left_open_ends_at_its_result(
        self, manager: TokenManager, wrapper: FakeWrapper, alice: Credentials, stop: str
    ) -> None:
        """The real keepalive endpoint can stay open after its result: the stream ends there
        and is closed, read to its end or left at the result, not held to the read timeout."""
        wrapper.hang_after_result = True
        started = time.monotonic()
        with (
            WrapperClient(manager, base_url=wrapper.url, timeout=30) as client,
            client.messages.stream(KEY, HELLO, keepalive=True) as stream,
        ):
            for event in stream:
                if stop == "break-at-result" and isinstance(event, ResultEvent):
                    break
        assert (REPLY, True) == (
            stream.result and stream.result.result,
            time.monotonic() - started < 15,  # the read timeout would be 30 s
        )

    def test_injected_client_keeps_the_long_default_timeout(
        self, manager: TokenManager, wrapper: FakeWrapper, alice: Credentials
    ) -> None:
        """An httpx client passed in does not shorten calls to its own timeout."""
        wrapper.fail_next(WrapperFault.delay(0.5))
        with (
            httpx.Client(timeout=0.1) as http,
            WrapperClient(manager, base_url=wrapper.url, http=http) as client,
        ):
            assert REPLY == client.messages.create(KEY, HELLO).text

    def test_keepalive_usage_limit_raises(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A limit reported in band on keepalive raises UsageLimitReached, with no refresh."""
        wrapper.fail_next(WrapperFault.cli_error("You've hit your limit · resets 8pm"))

        with pytest.raises(UsageLimitReached):
            list(client.messages.stream(KEY, HELLO, keepalive=True))

        assert 0 == fake.refresh_count

    def test_keepalive_other_failure_raises(
        self, client: WrapperClient, alice: Credentials, wrapper: FakeWrapper
    ) -> None:
        """A failed result on keepalive raises WrapperCLIError instead of ending quietly."""
        wrapper.fail_next(WrapperFault.cli_error("API Error: 500 Internal server error"))

        with pytest.raises(WrapperError, match="Internal server error"):
            list(client.messages.stream(KEY, HELLO, keepalive=True))

    def test_usage_limit_on_stream(
        self, client: WrapperClient, alice: Credentials, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A quota error replacing the stream raises UsageLimitReached without a refresh."""
        wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))

        with pytest.raises(UsageLimitReached):
            list(client.messages.stream(KEY, HELLO))

        assert 0 == fake.refresh_count


class TestSelfRefreshingWrapper:
    """The wrapper's CLI refreshes by itself inside 5 minutes of expiry and keeps the result."""

    def test_default_leeway_never_loses_the_refresh_token(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """A simulated day: nothing sent within 5 min of expiry, no self-refresh, 3 refreshes."""
        with (
            TokenManager(MemoryStore(), fake.provider(), journal=tmp_path, clock=clock) as manager,
            FakeWrapper(fake, self_refresh=True) as wrapper,
            WrapperClient(manager, base_url=wrapper.url) as client,
        ):
            manager.put(KEY, fake.issue())
            for _ in range(24 * 30):  # a call every two minutes
                clock.advance(120)
                client.messages.create(KEY, HELLO)
            final = manager.get(KEY)

        closest = min(call.expires_in for call in wrapper.calls if call.expires_in is not None)
        assert (720, {"ok"}, True, 0, 3, "current") == (
            len(wrapper.calls),
            set(outcomes(wrapper)),
            closest > timedelta(minutes=5),
            wrapper.self_refresh_count,
            fake.refresh_count,
            fake.refresh_token_state(final.refresh_token),
        )

    def test_short_leeway_loses_it(
        self, fake: FakeProvider, clock: FakeClock, tmp_path: Path
    ) -> None:
        """The counter-example: a 1-minute leeway lets the CLI consume the refresh token."""
        manager = TokenManager(
            MemoryStore(), fake.provider(), journal=tmp_path / "j", clock=clock, leeway=60
        )
        manager.put(KEY, fake.issue())
        with (
            FakeWrapper(fake, self_refresh=True) as wrapper,
            WrapperClient(manager, base_url=wrapper.url) as client,
        ):
            try:
                for _ in range(12 * 30):
                    clock.advance(120)
                    client.messages.create(KEY, HELLO)
            except ReauthRequired as exc:
                lost: ReauthRequired | None = exc
            else:
                lost = None

        assert (True, True) == (lost is not None, wrapper.self_refresh_count >= 1)
        manager.close()


class TestConcurrency:
    @pytest.mark.parametrize("repetition", range(10))
    def test_fifty_threads_one_refresh(
        self, store: MemoryStore, tmp_path: Path, repetition: int
    ) -> None:
        """50 threads calling for one due key make exactly one provider refresh between them."""
        with FakeProvider(latency=0.2) as slow:
            checking = FakeWrapper(slow)
            with (
                checking,
                TokenManager(store, slow.provider(), journal=tmp_path / "j") as manager,
                WrapperClient(manager, base_url=checking.url) as client,
            ):
                manager.put(KEY, slow.issue(expires_in=300))
                barrier = threading.Barrier(50)
                texts: list[str] = []
                errors: list[BaseException] = []

                def call() -> None:
                    barrier.wait()
                    try:
                        texts.append(client.messages.create(KEY, HELLO).text)
                    except BaseException as exc:  # noqa: BLE001 - reported by the assertion
                        errors.append(exc)

                threads = [threading.Thread(target=call) for _ in range(50)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

            assert (1, [], 50, {"ok"}) == (
                slow.refresh_count,
                errors,
                len(texts),
                {call.outcome for call in checking.calls},
            )


class TestSecrets:
    def test_no_token_in_errors_or_logs(
        self,
        client: WrapperClient,
        alice: Credentials,
        fake: FakeProvider,
        wrapper: FakeWrapper,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Every error path, logged at DEBUG, shows no token in messages, reprs or logs."""
        caplog.set_level(logging.DEBUG)
        wrapper.fail_next(
            WrapperFault.cli_timeout(),
            WrapperFault.cli_error(f"{FakeWrapper.INVALID_API_KEY}"),
            WrapperFault.cli_error(FakeWrapper.INVALID_API_KEY),
            WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT),
            WrapperFault.status(502, body="<html>bad gateway</html>"),
            WrapperFault.stream_error(after_deltas=1),
        )
        errors: list[WrapperError] = []
        for stream in (False, False, False, False, True):
            try:
                if stream:
                    list(client.messages.stream(KEY, HELLO))
                else:
                    client.messages.create(KEY, HELLO)
            except WrapperError as exc:
                errors.append(exc)
        shown = [text for e in errors for text in (str(e), repr(e), e.excerpt)]
        shown += [record.getMessage() for record in caplog.records]
        shown += [repr(call) for call in wrapper.calls]

        leaked = [t for t in fake.all_tokens() if any(t in text for text in shown)]
        assert (5, []) == (len(errors), leaked)


class TestAsync:
    @pytest.mark.anyio
    async def test_a_keepalive_stream_left_open_ends_at_its_result(
        self, aclient: AsyncWrapperClient, wrapper: FakeWrapper
    ) -> None:
        """The async stream ends at a keepalive result too, without waiting for more."""
        wrapper.hang_after_result = True
        started = time.monotonic()
        async with (
            AsyncWrapperClient(aclient.tokens, base_url=aclient.base_url, timeout=30) as client,
            client.messages.stream(KEY, HELLO, keepalive=True) as stream,
        ):
            events = [event async for event in stream]
        assert (ResultEvent, True) == (
            type(events[-1]),
            time.monotonic() - started < 15,  # the read timeout would be 30 s
        )

    @pytest.mark.anyio
    async def test_plain_http_elsewhere_refused(
        self, store: MemoryStore, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """The async client refuses plain http to a host other than loopback, as the sync one."""
        async with AsyncTokenManager(store, fake.provider(), journal=tmp_path / "aj") as tokens:
            with pytest.raises(ConfigurationError, match=r"base_url must use https \(plain http"):
                AsyncWrapperClient(tokens, base_url="http://wrapper.example.com")

    @pytest.mark.anyio
    async def test_async_with_closes_its_own_http_client(self, aclient: AsyncWrapperClient) -> None:
        """Leaving ``async with`` closes the httpx client the async client made."""
        async with AsyncWrapperClient(aclient.tokens, base_url=aclient.base_url) as client:
            pass

        assert client._http.is_closed

    @pytest.mark.anyio
    async def test_aclose_leaves_a_given_http_client_open(
        self, aclient: AsyncWrapperClient
    ) -> None:
        """aclose() leaves open an httpx.AsyncClient that was passed in."""
        async with httpx.AsyncClient() as http:
            client = AsyncWrapperClient(aclient.tokens, base_url=aclient.base_url, http=http)
            await client.aclose()

            assert not http.is_closed

    @pytest.mark.anyio
    async def test_create(self, aclient: AsyncWrapperClient) -> None:
        """An async call returns the reply."""
        assert REPLY == (await aclient.messages.create(KEY, HELLO)).text

    @pytest.mark.anyio
    async def test_revoked_token_retried(
        self, aclient: AsyncWrapperClient, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """The async client refreshes after an auth failure and retries once."""
        credentials = await aclient.tokens.get(KEY)
        fake.revoke_access_token(credentials)

        await aclient.messages.create(KEY, HELLO)

        assert (["token_revoked", "ok"], 1) == (outcomes(wrapper), fake.refresh_count)

    @pytest.mark.anyio
    @pytest.mark.parametrize("keepalive", [False, True], ids=["ndjson", "sse"])
    async def test_stream(self, aclient: AsyncWrapperClient, keepalive: bool) -> None:
        """An async stream yields the deltas in order and ends with the result."""
        async with aclient.messages.stream(KEY, HELLO, keepalive=keepalive) as stream:
            text = "".join([delta async for delta in stream.text_deltas()])

        assert (REPLY, REPLY) == (text, stream.result.result if stream.result else None)

    @pytest.mark.anyio
    async def test_a_stream_read_to_its_result_keeps_its_connection(
        self, aclient: AsyncWrapperClient
    ) -> None:
        """An async stream read to the result leaves its connection for the next call."""
        connections: list[object] = []

        async def note(response: httpx.Response) -> None:
            connections.append(response.extensions["network_stream"])

        async with httpx.AsyncClient(event_hooks={"response": [note]}) as http:
            client = AsyncWrapperClient(aclient.tokens, base_url=aclient.base_url, http=http)
            for _ in range(3):
                async with client.messages.stream(KEY, HELLO) as stream:
                    _ = [event async for event in stream]

        assert 1 == len({id(connection) for connection in connections})

    @pytest.mark.anyio
    async def test_many_tasks_one_refresh(
        self, aclient: AsyncWrapperClient, fake: FakeProvider, clock: FakeClock
    ) -> None:
        """100 tasks calling through an expiry make one refresh and all succeed."""
        clock.advance(timedelta(hours=8) - timedelta(minutes=10))

        texts = await asyncio.gather(*(aclient.messages.create(KEY, HELLO) for _ in range(100)))

        assert (1, {REPLY}) == (fake.refresh_count, {m.text for m in texts})
