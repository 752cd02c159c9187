"""Provider: the refresh requests it builds and how it classifies the answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus

import httpx
import pytest

from credkeeper import (
    ConfigurationError,
    Credentials,
    InvalidGrant,
    Provider,
    ProviderError,
    ProviderUnavailable,
    Secret,
)
from credkeeper._provider import SalvagedAnswer

NOW = datetime(2030, 5, 17, 12, 0, tzinfo=UTC)
OLD_ACCESS = "opaque-OLDaccess-4711"
OLD_REFRESH = "opaque-OLDrefresh-0815"
CLIENT_SECRET = "client-SECRET-value-42"
TOKEN_URL = "https://auth.example.com/oauth/token"
CLAUDE_CODE_CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
CLAUDE_CODE_SCOPE = (
    "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"
)
FIFTEEN_SECONDS = {"connect": 15.0, "read": 15.0, "write": 15.0, "pool": 15.0}
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "Refresh token not found or invalid",
}

PREVIOUS = Credentials(
    access_token=OLD_ACCESS,
    refresh_token=OLD_REFRESH,
    expires_at=NOW + timedelta(minutes=5),
    scopes=("user:profile",),
    subscription_type="max",
)


def json_body(request: httpx.Request) -> Any:
    return json.loads(request.content)


def form_body(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.content.decode("ascii"), keep_blank_values=True))


def response(status: int, body: object = None, **kwargs: Any) -> httpx.Response:
    if isinstance(body, str | bytes):
        return httpx.Response(status, content=body, **kwargs)
    return httpx.Response(status, json=body, **kwargs)


def parse(provider: Provider, reply: httpx.Response) -> Credentials:
    return provider.parse_response(reply, previous=PREVIOUS, now=NOW)


def generic(**options: Any) -> Provider:
    return Provider(token_url=TOKEN_URL, client_id="my-client", **options)


class TestClaudeCodeProfile:
    def test_method_and_url(self) -> None:
        """The profile POSTs to platform.claude.com's token endpoint."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert ("POST", "https://platform.claude.com/v1/oauth/token") == (
            request.method,
            str(request.url),
        )

    def test_json_body(self) -> None:
        """The body is JSON with grant type, refresh token, client id and scope."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert {
            "grant_type": "refresh_token",
            "refresh_token": OLD_REFRESH,
            "client_id": CLAUDE_CODE_CLIENT_ID,
            "scope": CLAUDE_CODE_SCOPE,
        } == json_body(request)

    def test_refresh_token_as_secret(self) -> None:
        """A refresh token given as a Secret is sent as its value."""
        request = Provider.claude_code().build_request(Secret(OLD_REFRESH))

        assert OLD_REFRESH == json_body(request)["refresh_token"]

    def test_content_type(self) -> None:
        """The body is declared as JSON."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert "application/json" == request.headers["Content-Type"]

    def test_user_agent(self) -> None:
        """The User-Agent starts with claude-cli/, which the endpoint expects."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert request.headers["User-Agent"].startswith("claude-cli/")

    def test_accepts_json(self) -> None:
        """The request asks for a JSON answer."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert "application/json" == request.headers["Accept"]

    def test_timeout(self) -> None:
        """The request carries a 15 s timeout extension."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert FIFTEEN_SECONDS == request.extensions["timeout"]

    def test_custom_timeout(self) -> None:
        """A timeout given to the profile reaches the request."""
        request = Provider.claude_code(timeout=4).build_request(OLD_REFRESH)

        assert 4.0 == request.extensions["timeout"]["read"]

    def test_headers_override(self) -> None:
        """Headers given to the profile are added and may replace the User-Agent."""
        request = Provider.claude_code(
            headers={"User-Agent": "claude-cli/9.9 (mine)", "X-Extra": "1"}
        ).build_request(OLD_REFRESH)

        assert ("claude-cli/9.9 (mine)", "1") == (
            request.headers["User-Agent"],
            request.headers["X-Extra"],
        )

    def test_no_authorization_header(self) -> None:
        """A public client sends no Authorization header."""
        request = Provider.claude_code().build_request(OLD_REFRESH)

        assert "Authorization" not in request.headers

    def test_name(self) -> None:
        """The profile is named claude-code."""
        assert "claude-code" == Provider.claude_code().name


class TestWrapperGuideProfile:
    def test_url(self) -> None:
        """The profile POSTs to the URL the wrapper's guide names."""
        request = Provider.wrapper_guide().build_request(OLD_REFRESH)

        assert ("POST", "https://api.claude.ai/api/auth/oauth/token") == (
            request.method,
            str(request.url),
        )

    def test_json_body_without_client_id(self) -> None:
        """The body is JSON with grant type and refresh token and no client id."""
        request = Provider.wrapper_guide().build_request(OLD_REFRESH)

        assert {"grant_type": "refresh_token", "refresh_token": OLD_REFRESH} == json_body(request)

    def test_timeout(self) -> None:
        """The request carries a 15 s timeout extension."""
        request = Provider.wrapper_guide().build_request(OLD_REFRESH)

        assert FIFTEEN_SECONDS == request.extensions["timeout"]


class TestGenericProvider:
    def test_form_body_by_default(self) -> None:
        """An RFC 6749 provider sends a form-encoded body by default."""
        request = generic().build_request(OLD_REFRESH)

        assert (
            "application/x-www-form-urlencoded",
            {"grant_type": "refresh_token", "refresh_token": OLD_REFRESH, "client_id": "my-client"},
        ) == (request.headers["Content-Type"], form_body(request))

    def test_json_body_on_request(self) -> None:
        """body_format='json' sends the same parameters as JSON."""
        request = generic(body_format="json").build_request(OLD_REFRESH)

        assert {
            "grant_type": "refresh_token",
            "refresh_token": OLD_REFRESH,
            "client_id": "my-client",
        } == json_body(request)

    def test_scope(self) -> None:
        """A configured scope is sent."""
        request = generic(scope="read write").build_request(OLD_REFRESH)

        assert "read write" == form_body(request)["scope"]

    def test_without_client_id(self) -> None:
        """Without a client id, none is sent."""
        request = Provider(token_url=TOKEN_URL).build_request(OLD_REFRESH)

        assert {"grant_type": "refresh_token", "refresh_token": OLD_REFRESH} == form_body(request)

    def test_client_secret_post(self) -> None:
        """client_secret_post puts the id and secret in the body and sends no Authorization."""
        request = generic(
            client_secret=CLIENT_SECRET, auth_method="client_secret_post"
        ).build_request(OLD_REFRESH)

        body = form_body(request)
        assert (CLIENT_SECRET, "my-client", False) == (
            body["client_secret"],
            body["client_id"],
            "Authorization" in request.headers,
        )

    def test_client_secret_basic_header(self) -> None:
        """client_secret_basic sends Basic credentials of the id and the secret."""
        request = generic(
            client_secret=CLIENT_SECRET, auth_method="client_secret_basic"
        ).build_request(OLD_REFRESH)

        expected = "Basic " + base64.b64encode(f"my-client:{CLIENT_SECRET}".encode()).decode()
        assert expected == request.headers["Authorization"]

    def test_client_secret_basic_keeps_secret_out_of_body(self) -> None:
        """client_secret_basic sends neither the secret nor the id in the body."""
        request = generic(
            client_secret=CLIENT_SECRET, auth_method="client_secret_basic"
        ).build_request(OLD_REFRESH)

        body = request.content.decode()
        assert (False, False) == (CLIENT_SECRET in body, "client_secret" in body)

    def test_client_secret_basic_form_encodes(self) -> None:
        """Basic credentials form-encode id and secret (RFC 6749 2.3.1), so ':' cannot split."""
        client_id, secret = "id:with space+plus", "s3cr:t %&+£€"
        provider = Provider(
            token_url=TOKEN_URL,
            client_id=client_id,
            client_secret=secret,
            auth_method="client_secret_basic",
        )

        header = provider.build_request(OLD_REFRESH).headers["Authorization"]
        scheme, _, encoded = header.partition(" ")
        raw_id, colons, raw_secret = base64.b64decode(encoded).decode("ascii").partition(":")
        assert ("Basic", ":", client_id, secret) == (
            scheme,
            colons,
            unquote_plus(raw_id),
            unquote_plus(raw_secret),
        )

    def test_secret_defaults_to_basic(self) -> None:
        """A client secret without an auth_method uses client_secret_basic."""
        assert "client_secret_basic" == generic(client_secret=CLIENT_SECRET).auth_method

    def test_extra_params_merged(self) -> None:
        """extra_params are added to the body."""
        request = generic(extra_params={"audience": "api", "resource": "r1"}).build_request(
            OLD_REFRESH
        )

        body = form_body(request)
        assert ("api", "r1", OLD_REFRESH) == (
            body["audience"],
            body["resource"],
            body["refresh_token"],
        )

    def test_extra_params_in_json(self) -> None:
        """extra_params are added to a JSON body too."""
        request = generic(body_format="json", extra_params={"audience": "api"}).build_request(
            OLD_REFRESH
        )

        assert "api" == json_body(request)["audience"]

    def test_extra_headers(self) -> None:
        """Configured headers are sent."""
        request = generic(headers={"X-Tenant": "t1"}).build_request(OLD_REFRESH)

        assert "t1" == request.headers["X-Tenant"]

    def test_timeout(self) -> None:
        """The configured timeout reaches every phase of the request."""
        request = generic(timeout=2.5).build_request(OLD_REFRESH)

        assert {"connect": 2.5, "read": 2.5, "write": 2.5, "pool": 2.5} == request.extensions[
            "timeout"
        ]

    def test_name_defaults_to_host(self) -> None:
        """Without a name the provider is named after the token URL's host."""
        assert "auth.example.com" == generic().name

    @pytest.mark.parametrize(
        "url",
        ["http://127.0.0.1:8080/token", "http://localhost/token", "http://[::1]:9000/token"],
    )
    def test_http_on_loopback(self, url: str) -> None:
        """Plain http is accepted on loopback."""
        assert url == Provider(token_url=url).token_url

    @pytest.mark.parametrize(
        "url", ["http://auth.example.com/token", "http://10.0.0.1/token", "http://127.0.0.2/token"]
    )
    def test_http_elsewhere_refused(self, url: str) -> None:
        """Plain http to a non-loopback host raises ConfigurationError naming https."""
        with pytest.raises(ConfigurationError, match="https"):
            Provider(token_url=url)

    def test_http_refusal_hides_url_password(self) -> None:
        """The refusal of a plain http token_url does not repeat a password in it."""
        with pytest.raises(ConfigurationError) as info:
            Provider(token_url="http://id:hunter2@auth.example.com/token")

        assert "hunter2" not in str(info.value)

    @pytest.mark.parametrize(
        "url", ["", "auth.example.com/token", "ftp://auth.example.com/token", "https:///token"]
    )
    def test_not_a_url_refused(self, url: str) -> None:
        """A token_url that is not an absolute http(s) URL raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="token_url"):
            Provider(token_url=url)

    def test_malformed_url_refused(self) -> None:
        """A malformed token_url raises ConfigurationError naming token_url."""
        with pytest.raises(ConfigurationError, match="token_url"):
            Provider(token_url="https://[::1/token")

    @pytest.mark.parametrize(
        ("options", "named"),
        [
            ({"auth_method": "private_key_jwt", "client_secret": "s"}, "auth_method"),
            ({"auth_method": "none", "client_secret": "s"}, "client_secret"),
            ({"auth_method": "client_secret_post"}, "client_secret"),
            ({"auth_method": "client_secret_basic"}, "client_secret"),
            ({"body_format": "xml"}, "body_format"),
            ({"timeout": 0}, "timeout"),
            ({"timeout": -1.0}, "timeout"),
            ({"timeout": True}, "timeout"),
            ({"timeout": "15"}, "timeout"),
            ({"client_secret": 42, "auth_method": "client_secret_post"}, "client_secret"),
        ],
        ids=[
            "unknown-method",
            "secret-with-method-none",
            "post-without-secret",
            "basic-without-secret",
            "body-format",
            "timeout-zero",
            "timeout-negative",
            "timeout-bool",
            "timeout-str",
            "secret-not-str",
        ],
    )
    def test_bad_option(self, options: dict[str, Any], named: str) -> None:
        """A bad option raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=named):
            generic(**options)

    def test_secret_method_without_client_id(self) -> None:
        """Client authentication without a client id raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="client_id"):
            Provider(
                token_url=TOKEN_URL, client_secret=CLIENT_SECRET, auth_method="client_secret_post"
            )

    @pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
    def test_repr_hides_secret(self, method: str) -> None:
        """The repr shows the provider but not the client secret."""
        text = repr(generic(client_secret=CLIENT_SECRET, auth_method=method))

        assert (False, True) == ("SECRET-value" in text, TOKEN_URL in text)


class TestParseSuccess:
    def test_new_credentials(self) -> None:
        """A 200 JSON answer becomes Credentials expiring expires_in after now."""
        reply = response(
            200,
            {
                "access_token": "new-access",
                "refresh_token": "new-refresh",
                "expires_in": 28800,
                "scope": "user:profile user:inference",
                "token_type": "Bearer",
            },
        )

        assert Credentials(
            access_token="new-access",
            refresh_token="new-refresh",
            expires_at=NOW + timedelta(hours=8),
            scopes=("user:profile", "user:inference"),
            subscription_type="max",
        ) == parse(Provider.claude_code(), reply)

    def test_keeps_previous_refresh_token(self) -> None:
        """A 200 answer without refresh_token keeps the previous one."""
        reply = response(200, {"access_token": "new-access", "expires_in": 3600})

        creds = parse(generic(), reply)

        assert (OLD_REFRESH, NOW + timedelta(hours=1)) == (
            creds.refresh_token.get_secret_value(),
            creds.expires_at,
        )

    def test_other_2xx(self) -> None:
        """Any 2xx answer with a token body is a success."""
        reply = response(201, {"access_token": "new-access", "expires_in": 60})

        assert "new-access" == parse(generic(), reply).access_token.get_secret_value()

    def test_html_body(self) -> None:
        """A 200 with an HTML body raises ProviderError carrying status 200 and an excerpt."""
        reply = response(200, "<html><body>Just a moment...</body></html>")

        with pytest.raises(ProviderError) as info:
            parse(Provider.claude_code(), reply)

        assert (ProviderError, 200, "<html><body>Just a moment...</body></html>") == (
            type(info.value),
            info.value.status,
            info.value.excerpt,
        )

    def test_answer_without_expiry_is_kept_as_already_due(self) -> None:
        """A 200 without any expiry (RFC 6749 only recommends one) gives its tokens, due at
        once."""
        reply = response(200, {"access_token": "new-access", "refresh_token": "new-refresh"})

        credentials = parse(generic(), reply)

        assert ("new-access", "new-refresh", NOW) == (
            credentials.access_token.get_secret_value(),
            credentials.refresh_token.get_secret_value(),
            credentials.expires_at,
        )

    def test_answer_with_unreadable_expiry_is_kept_as_already_due(self) -> None:
        """An expiry beyond float range does not cost the rotated tokens either."""
        reply = response(200, '{"access_token": "a", "expires_in": 1' + "0" * 400 + "}")

        assert NOW == salvaged(generic(), reply).credentials.expires_at

    def test_answer_without_any_token_raises_provider_error(self) -> None:
        """A 200 JSON answer without tokens raises ProviderError, not CredentialsError."""
        reply = response(200, {"expires_in": 3600})

        with pytest.raises(ProviderError) as info:
            parse(generic(), reply)

        assert (ProviderError, 200) == (type(info.value), info.value.status)


UNUSABLE_ACCESS = {
    "missing": {},
    "null": {"access_token": None},
    "empty": {"access_token": ""},
    "number": {"access_token": 42},
    "list": {"access_token": ["x"]},
    "lone-surrogate": {"access_token": "new-access-\ud800-half"},
}


def salvaged(provider: Provider, reply: httpx.Response) -> SalvagedAnswer:
    with pytest.raises(SalvagedAnswer) as info:
        parse(provider, reply)
    return info.value


class TestSalvage:
    @pytest.mark.parametrize("access", UNUSABLE_ACCESS.values(), ids=UNUSABLE_ACCESS.keys())
    def test_rotated_refresh_token_is_kept(self, access: dict[str, Any]) -> None:
        """An unusable access token beside a new refresh token keeps that refresh token, due now."""
        # As JSON text: a lone surrogate only travels escaped.
        body = json.dumps({**access, "refresh_token": "new-refresh", "expires_in": 3600})

        assert (
            Credentials(
                access_token=OLD_ACCESS,
                refresh_token="new-refresh",
                expires_at=NOW,
                scopes=("user:profile",),
                subscription_type="max",
            )
            == salvaged(generic(), response(200, body)).credentials
        )

    def test_is_a_provider_error_with_status_200(self) -> None:
        """The salvaged answer is a ProviderError carrying the answer's status."""
        reply = response(200, {"access_token": 42, "refresh_token": "new-refresh"})

        assert 200 == salvaged(generic(), reply).status

    def test_message_names_the_field_and_the_kept_token(self) -> None:
        """The message names the unusable field and says the new refresh token was kept."""
        reply = response(200, {"access_token": 42, "refresh_token": "new-refresh"})

        message = str(salvaged(generic(), reply))

        assert (True, True) == ("access_token" in message, "tokens it holds were kept" in message)

    def test_message_quotes_no_token(self) -> None:
        """Neither the message nor the excerpt shows the new refresh token or the old ones."""
        reply = response(200, {"access_token": [], "refresh_token": "LEAKEDnewRefresh"})

        error = salvaged(generic(), reply)

        text = f"{error} {error.excerpt}"
        assert [] == [leak for leak in LEAKS if leak in text]

    @pytest.mark.parametrize(
        "refresh",
        [{}, {"refresh_token": None}, {"refresh_token": ""}, {"refresh_token": 7}],
        ids=["missing", "null", "empty", "number"],
    )
    def test_nothing_kept_without_a_readable_refresh_token(self, refresh: dict[str, Any]) -> None:
        """Without a readable new refresh token the answer is a plain ProviderError."""
        reply = response(200, {"access_token": 42, **refresh, "expires_in": 60})

        with pytest.raises(ProviderError) as info:
            parse(generic(), reply)

        assert ProviderError is type(info.value)

    def test_nothing_kept_when_the_refresh_token_did_not_rotate(self) -> None:
        """An unusable access token beside the same refresh token has nothing to keep."""
        reply = response(200, {"access_token": "", "refresh_token": OLD_REFRESH})

        with pytest.raises(ProviderError) as info:
            parse(generic(), reply)

        assert ProviderError is type(info.value)

    def test_lone_surrogate_in_refresh_token_refused(self) -> None:
        """A new refresh token holding a lone surrogate is refused: it could never be stored."""
        reply = response(
            200, '{"access_token": "new-access", "refresh_token": "new-\\ud800", "expires_in": 9}'
        )

        with pytest.raises(ProviderError) as info:
            parse(generic(), reply)

        assert (ProviderError, True) == (type(info.value), "refresh_token" in str(info.value))


class TestParseFailure:
    @pytest.mark.parametrize("status", [400, 401])
    def test_invalid_grant(self, status: int) -> None:
        """400 and 401 with error invalid_grant raise InvalidGrant with the status."""
        with pytest.raises(InvalidGrant) as info:
            parse(Provider.claude_code(), response(status, INVALID_GRANT))

        assert status == info.value.status

    def test_invalid_request(self) -> None:
        """400 invalid_request raises a plain ProviderError naming the error code."""
        reply = response(400, {"error": "invalid_request", "error_description": "bad format"})

        with pytest.raises(ProviderError) as info:
            parse(Provider.claude_code(), reply)

        assert (ProviderError, 400, True) == (
            type(info.value),
            info.value.status,
            "invalid_request" in str(info.value),
        )

    def test_invalid_grant_on_other_status(self) -> None:
        """invalid_grant with a status other than 400/401 is not InvalidGrant."""
        with pytest.raises(ProviderError) as info:
            parse(generic(), response(403, INVALID_GRANT))

        assert ProviderError is type(info.value)

    def test_401_without_code(self) -> None:
        """A 401 without invalid_grant is a plain ProviderError."""
        with pytest.raises(ProviderError) as info:
            parse(generic(), response(401, {"error": "invalid_client"}))

        assert (ProviderError, 401) == (type(info.value), info.value.status)

    def test_retry_after_seconds(self) -> None:
        """429 with Retry-After: 7 raises ProviderUnavailable with retry_after 7."""
        reply = response(429, "slow down", headers={"Retry-After": "7"})

        with pytest.raises(ProviderUnavailable) as info:
            parse(Provider.claude_code(), reply)

        assert (429, 7) == (info.value.status, info.value.retry_after)

    def test_retry_after_http_date(self) -> None:
        """An HTTP-date Retry-After is read as seconds after now."""
        reply = response(429, "", headers={"Retry-After": "Fri, 17 May 2030 12:00:30 GMT"})

        with pytest.raises(ProviderUnavailable) as info:
            parse(generic(), reply)

        assert 30 == info.value.retry_after

    def test_retry_after_in_the_past(self) -> None:
        """An HTTP-date Retry-After already past gives a delay of 0."""
        reply = response(503, "", headers={"Retry-After": "Fri, 17 May 2030 11:00:00 GMT"})

        with pytest.raises(ProviderUnavailable) as info:
            parse(generic(), reply)

        assert 0 == info.value.retry_after

    @pytest.mark.parametrize("value", [None, "soon", "1.5", ""])
    def test_retry_after_absent_or_unreadable(self, value: str | None) -> None:
        """Without a readable Retry-After, retry_after is None."""
        headers = {} if value is None else {"Retry-After": value}

        with pytest.raises(ProviderUnavailable) as info:
            parse(generic(), response(429, "", headers=headers))

        assert None is info.value.retry_after

    def test_retry_after_non_ascii_digit(self) -> None:
        """A Retry-After of a non-ASCII digit is unreadable, not a crash."""
        reply = httpx.Response(429, headers=[(b"Retry-After", b"\xb2")])

        with pytest.raises(ProviderUnavailable) as info:
            parse(generic(), reply)

        assert None is info.value.retry_after

    @pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
    def test_unavailable(self, status: int) -> None:
        """408, 425, 429 and 5xx raise ProviderUnavailable with the status."""
        with pytest.raises(ProviderUnavailable) as info:
            parse(generic(), response(status, "upstream trouble"))

        assert (status, "upstream trouble") == (info.value.status, info.value.excerpt)

    def test_server_error_with_invalid_grant_body(self) -> None:
        """A 5xx is unavailable even when its body says invalid_grant."""
        with pytest.raises(ProviderUnavailable):
            parse(generic(), response(500, INVALID_GRANT))

    def test_not_found(self) -> None:
        """404 (the legacy host) raises a plain ProviderError."""
        body = {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}

        with pytest.raises(ProviderError) as info:
            parse(Provider.claude_code(), response(404, body))

        assert (ProviderError, 404) == (type(info.value), info.value.status)

    def test_message_names_provider(self) -> None:
        """The error message names the provider and the status."""
        with pytest.raises(ProviderError) as info:
            parse(Provider.claude_code(), response(404, "nope"))

        assert ("claude-code" in str(info.value), "404" in str(info.value)) == (True, True)

    def test_excerpt_is_bounded(self) -> None:
        """A long body is quoted as a short single-line excerpt."""
        with pytest.raises(ProviderError) as info:
            parse(generic(), response(500, "line\n" * 1000))

        assert (True, False) == (len(info.value.excerpt) <= 200, "\n" in info.value.excerpt)

    def test_deeply_nested_error_body(self) -> None:
        """A deeply nested JSON error body raises ProviderError, not RecursionError."""
        with pytest.raises(ProviderError):
            parse(generic(), response(400, "[" * 100_000))


SECRET_BODIES = {
    "previous-refresh": f"invalid refresh token {OLD_REFRESH} (argv: claude --token {OLD_REFRESH})",
    "previous-access": f"token {OLD_ACCESS} expired",
    "oat-token": "timed out running claude with sk-ant-oat01-LEAKEDaccessTOKEN_abc-123",
    "ort-token": "refresh sk-ant-ort01-LEAKEDrefreshTOKEN_xyz failed",
    "json-access": '{"error": "server_error", "access_token": "LEAKEDopaqueAccess99"}',
    "json-refresh": '{"error": "invalid_request", "refresh_token": "LEAKEDopaqueRefresh77"}',
    "bearer": "Authorization: Bearer LEAKEDbearerValue.abc failed",
    "client-secret": f"bad client credentials {CLIENT_SECRET}",
}
LEAKS = ("OLDaccess", "OLDrefresh", "LEAKED", "SECRET-value")
NEW_ACCESS = "NEWopaqueAccessQZXJ4711abc"
NEW_REFRESH = "NEWopaqueRefreshQZXJ0815xyz"
# Tokens whose JSON and URL encodings differ from their plain form.
ODD_ACCESS = 'acc/QZXJ+4711=é"quoted"'
ODD_REFRESH = "ref/QZXJ+0815=ü\\back"


class TestParseRedaction:
    @pytest.mark.parametrize("body", SECRET_BODIES.values(), ids=SECRET_BODIES.keys())
    @pytest.mark.parametrize("status", [200, 400, 401, 404, 429, 500])
    def test_no_token_in_error(self, status: int, body: str) -> None:
        """Neither the message nor the excerpt of the error contains a token."""
        provider = generic(client_secret=CLIENT_SECRET, auth_method="client_secret_post")
        if status == 200 and body.lstrip().startswith("{"):
            # Make the 200 unusable beyond salvage, so that an error is what comes back.
            body = body.rstrip().rstrip("}") + ', "refresh_token": 42}'

        with pytest.raises(ProviderError) as info:
            parse(provider, response(status, body))

        text = f"{info.value} {info.value.excerpt!r} {info.value!r}"
        assert [] == [leak for leak in LEAKS if leak in text]

    def test_invalid_grant_echoing_token(self) -> None:
        """An invalid_grant body that echoes the refresh token does not reveal it."""
        body = {**INVALID_GRANT, "refresh_token": OLD_REFRESH}

        with pytest.raises(InvalidGrant) as info:
            parse(Provider.claude_code(), response(400, body))

        assert (False, False) == (
            "OLDrefresh" in str(info.value),
            "OLDrefresh" in info.value.excerpt,
        )

    @pytest.mark.parametrize(
        "body",
        [
            {"data": {"access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH}},
            {"accessToken": NEW_ACCESS, "refreshToken": NEW_REFRESH, "expiresIn": 60},
            {"access_token": [NEW_ACCESS], "refresh_token": [NEW_REFRESH]},
            {"result": [{"at": NEW_ACCESS, "rt": NEW_REFRESH}]},
        ],
        ids=["nested", "camel-case", "lists", "unknown-names"],
    )
    def test_unreadable_success_body_hides_received_tokens(self, body: dict[str, Any]) -> None:
        """A 200 body the parser cannot read shows none of the new tokens it carries."""
        with pytest.raises(ProviderError) as info:
            parse(generic(), response(200, body))

        text = f"{info.value} {info.value.excerpt}"
        assert [] == [token for token in (NEW_ACCESS, NEW_REFRESH) if token in text]

    @pytest.mark.parametrize(
        "encode",
        [lambda s: s, lambda s: json.dumps(s)[1:-1], lambda s: quote(s, safe=""), quote_plus],
        ids=["plain", "json", "url", "url-plus"],
    )
    def test_sent_tokens_hidden_in_every_encoding(self, encode: Callable[[str], str]) -> None:
        """The tokens sent are masked plain, JSON-escaped and URL-encoded."""
        previous = Credentials(access_token=ODD_ACCESS, refresh_token=ODD_REFRESH, expires_at=NOW)
        body = f"refresh_token={encode(ODD_REFRESH)} access={encode(ODD_ACCESS)}"

        with pytest.raises(ProviderError) as info:
            generic().parse_response(response(400, body), previous=previous, now=NOW)

        text = f"{info.value} {info.value.excerpt}"
        assert [] == [
            form
            for token in (ODD_ACCESS, ODD_REFRESH)
            for form in {token, json.dumps(token)[1:-1], quote(token, safe="")}
            if form in text
        ]

    def test_success_body_unusable_with_new_token(self) -> None:
        """A 200 body that cannot be used does not reveal the new token it carries."""
        reply = response(200, {"access_token": "LEAKEDnewAccess", "refresh_token": 42})

        with pytest.raises(ProviderError) as info:
            parse(generic(), reply)

        assert "LEAKED" not in f"{info.value} {info.value.excerpt}"


class TestUnavailable:
    def test_timeout(self) -> None:
        """A timeout becomes ProviderUnavailable saying it timed out, without a status."""
        exc = Provider.claude_code().unavailable(httpx.ReadTimeout("read timed out"))

        assert (ProviderUnavailable, None, True) == (
            type(exc),
            exc.status,
            "timed out" in str(exc),
        )

    def test_connect_error(self) -> None:
        """A refused connection becomes ProviderUnavailable saying it failed."""
        exc = generic().unavailable(httpx.ConnectError("connection refused"))

        assert (ProviderUnavailable, True, False) == (
            type(exc),
            "failed" in str(exc),
            "timed out" in str(exc),
        )

    def test_names_provider(self) -> None:
        """The message names the provider."""
        exc = Provider.claude_code().unavailable(httpx.ConnectTimeout("slow"))

        assert "claude-code" in str(exc)
