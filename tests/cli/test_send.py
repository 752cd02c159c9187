"""`credkeeper send KEY PROMPT`: a wrapper call as KEY, the reply streamed to stdout."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
from click.testing import Result

from credkeeper.cli._errors import ExitCode
from credkeeper.testing import FakeProvider, FakeWrapper, Fault, WrapperFault
from tests.echoes import unprocessable

from .conftest import Cli, error_line, import_credentials, leaked


@pytest.fixture
def send(run: Cli, wrapper: FakeWrapper) -> Cli:
    """The command line pointed at the fake wrapper."""
    return Cli([*run.options, "--wrapper-url", wrapper.url])


class TestSend:
    def test_streams_the_reply(self, send: Cli, fake: FakeProvider) -> None:
        """The reply's text is printed, followed by a newline."""
        import_credentials(send, "alice", fake.issue())

        result = send("send", "alice", "hello there")

        assert (0, "You said: hello there\n") == (result.exit_code, result.stdout)

    @pytest.mark.parametrize("keepalive", [[], ["--keepalive"]], ids=["ndjson", "sse"])
    def test_prompt_from_stdin(self, send: Cli, fake: FakeProvider, keepalive: list[str]) -> None:
        """'-' reads the prompt from stdin, on either stream endpoint."""
        import_credentials(send, "alice", fake.issue())

        result = send("send", "alice", "-", *keepalive, input="from stdin")

        assert "You said: from stdin\n" == result.stdout

    def test_due_token_refreshed_first(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A token within the leeway is refreshed once before the call, and the call works."""
        import_credentials(send, "alice", fake.issue(expires_in=120))

        result = send("send", "alice", "hi")

        assert (0, 1, ["ok"]) == (
            result.exit_code,
            fake.refresh_count,
            [call.outcome for call in wrapper.calls],
        )

    def test_usage_limit_is_one_line_exit_8(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A usage limit exits 8 with one error line and no token."""
        import_credentials(send, "alice", fake.issue())
        wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))

        result = send("send", "alice", "hi")

        assert ExitCode.WRAPPER == result.exit_code
        assert "reached a usage limit" in error_line(result)
        assert set() == leaked(fake, result)

    @pytest.mark.parametrize(
        ("fault", "code"),
        [
            (WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT), ExitCode.WRAPPER),
            (WrapperFault.cli_error("API Error: 500 overloaded"), ExitCode.WRAPPER),
        ],
        ids=["limit", "cli-error"],
    )
    def test_keepalive_failure_is_not_silent(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper, fault: WrapperFault, code: int
    ) -> None:
        """A failure reported in band on keepalive exits non-zero with one error line."""
        import_credentials(send, "alice", fake.issue())
        wrapper.fail_next(fault)

        result = send("send", "alice", "hi", "--keepalive")

        assert (code, 1) == (result.exit_code, len(result.stderr.splitlines()))

    def test_keepalive_revoked_token_is_refreshed(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A revoked token on keepalive is refreshed and the reply still streams."""
        credentials = fake.issue()
        import_credentials(send, "alice", credentials)
        fake.revoke_access_token(credentials)

        result = send("send", "alice", "hi", "--keepalive")

        assert (0, "You said: hi\n", 1) == (result.exit_code, result.stdout, fake.refresh_count)

    def test_wrapper_timeout_error_hides_tokens(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A 500 echoing the tokens exits 8, and its line shows none of them."""
        import_credentials(send, "alice", fake.issue())
        wrapper.fail_next(WrapperFault.cli_timeout())

        result = send("send", "alice", "hi")

        assert (ExitCode.WRAPPER, set()) == (result.exit_code, leaked(fake, result))
        assert "HTTP 500" in error_line(result)

    def test_empty_model_is_usage_error(self, send: Cli, fake: FakeProvider) -> None:
        """A request the wrapper would refuse (no model) exits 2 before anything is sent."""
        import_credentials(send, "alice", fake.issue())

        result = send("send", "alice", "hi", "--model", "")

        assert (ExitCode.USAGE, True) == (result.exit_code, "model" in error_line(result))

    def test_invalid_request_echo_hides_tokens(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A 422 whose msg and input echo the credentials exits 2, and its line shows none."""
        result = refused_as_unprocessable(send, fake, wrapper)

        assert (ExitCode.USAGE, set()) == (result.exit_code, leaked(fake, result))

    def test_plain_http_wrapper_url_refused(self, run: Cli, fake: FakeProvider) -> None:
        """A --wrapper-url in plain http to another host exits 2 naming https; nothing is sent."""
        import_credentials(run, "alice", fake.issue())

        result = Cli([*run.options, "--wrapper-url", "http://wrapper.example.com"])(
            "send", "alice", "hi"
        )

        assert (ExitCode.USAGE, True) == (result.exit_code, "must use https" in error_line(result))


def opaque(kind: str) -> str:
    return f"1//{kind}.{secrets.token_hex(12)}+{secrets.token_hex(6)}/{secrets.token_hex(6)}="


class TestOpaqueTokens:
    @pytest.fixture
    def fake(self) -> Iterator[FakeProvider]:
        """A provider minting tokens without the sk-ant- shape the patterns would catch."""
        with FakeProvider(mint=opaque) as provider:
            yield provider

    def test_unreadable_token_answer_hides_new_tokens(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A 200 token answer with tokens in lists exits 5, and its line shows no token."""
        import_credentials(send, "alice", fake.issue(expires_in=120))
        fake.fail_next(
            Fault.reshape(
                lambda answer: {
                    **answer,
                    "access_token": [answer["access_token"]],
                    "refresh_token": [answer["refresh_token"]],
                }
            )
        )

        result = send("send", "alice", "hi")

        assert (ExitCode.PROVIDER, set()) == (result.exit_code, leaked(fake, result))

    def test_invalid_request_echo_hides_tokens(
        self, send: Cli, fake: FakeProvider, wrapper: FakeWrapper
    ) -> None:
        """A 422 echoing opaque tokens URL-encoded exits 2, and its line shows none of them."""
        result = refused_as_unprocessable(send, fake, wrapper)

        shown = result.stdout + result.stderr
        assert (ExitCode.USAGE, []) == (
            result.exit_code,
            [form for form in encoded(fake.all_tokens()) if form in shown],
        )


def refused_as_unprocessable(send: Cli, fake: FakeProvider, wrapper: FakeWrapper) -> Result:
    """``send`` as alice, whose call the wrapper answers with a 422 echoing her credentials."""
    credentials = fake.issue()
    import_credentials(send, "alice", credentials)
    wrapper.fail_next(unprocessable(credentials))
    return send("send", "alice", "hi")


def encoded(tokens: set[str]) -> set[str]:
    return {form for token in tokens for form in (token, quote(token, safe=""), quote_plus(token))}
