"""FakeProvider: a rotating OAuth token endpoint over real loopback HTTP."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from credkeeper import Credentials, MemoryStore, Provider, Secret, TokenManager
from credkeeper.testing import FakeClock, FakeProvider, Fault, RefreshCall

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "Refresh token not found or invalid",
}
INVALID_REQUEST = {"error": "invalid_request", "error_description": "Invalid request format"}

MakeFake = Callable[..., FakeProvider]


@pytest.fixture
def make_fake() -> Iterator[MakeFake]:
    started: list[FakeProvider] = []

    def make(**options: Any) -> FakeProvider:
        fake = FakeProvider(**options).start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake(make_fake: MakeFake) -> FakeProvider:
    return make_fake()


# Loading the CA bundle costs more than a loopback request; every client shares one context.
TLS = ssl.create_default_context()


def http_client(*, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, verify=TLS)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with http_client() as http:
        yield http


def token_of(credentials: Credentials) -> str:
    return credentials.refresh_token.get_secret_value()


def refresh(
    client: httpx.Client, fake: FakeProvider, token: str | Credentials, **fields: Any
) -> httpx.Response:
    """POST a Claude Code style JSON refresh; a field set to None is left out."""
    body = {
        "grant_type": "refresh_token",
        "refresh_token": token_of(token) if isinstance(token, Credentials) else token,
        "client_id": CLIENT_ID,
        "scope": "user:inference user:profile",
        **fields,
    }
    return client.post(fake.token_url, json={k: v for k, v in body.items() if v is not None})


class TestRotation:
    def test_refresh_answers_the_documented_fields(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A good refresh answers 200 with exactly the fields the real endpoint sends."""
        response = refresh(client, fake, fake.issue())

        expected = {
            "access_token",
            "refresh_token",
            "expires_in",
            "scope",
            "token_type",
            "account",
            "organization",
        }
        assert (200, expected) == (response.status_code, set(response.json()))

    def test_refresh_answers_anthropic_shaped_tokens(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """The new tokens carry the sk-ant-oat01- and sk-ant-ort01- prefixes."""
        body = refresh(client, fake, fake.issue()).json()

        prefixes = (body["access_token"][:13], body["refresh_token"][:13])
        assert ("sk-ant-oat01-", "sk-ant-ort01-") == prefixes

    def test_refresh_answers_lifetime_scope_and_bearer(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """expires_in is the configured lifetime as an int, with the scope and token_type."""
        fake = make_fake(access_token_lifetime=3600.7, scope="user:inference")

        body = refresh(client, fake, fake.issue()).json()

        actual = (body["expires_in"], body["scope"], body["token_type"])
        assert (3600, "user:inference", "Bearer") == actual

    def test_refresh_answers_account_and_organization(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """The answer names the account and organization, as client.ts reads them."""
        body = refresh(client, fake, fake.issue()).json()

        shapes = (set(body["account"]), set(body["organization"]))
        assert ({"uuid", "email_address"}, {"uuid", "name"}) == shapes

    def test_every_refresh_returns_a_new_refresh_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Chained refreshes hand out a different refresh token each time."""
        first = fake.issue()
        second = refresh(client, fake, first).json()["refresh_token"]
        third = refresh(client, fake, second).json()["refresh_token"]

        assert 3 == len({token_of(first), second, third})

    def test_presented_refresh_token_dies_immediately(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """After a refresh the old refresh token is used and the new one is current."""
        credentials = fake.issue()

        new = refresh(client, fake, credentials).json()["refresh_token"]

        states = (fake.refresh_token_state(token_of(credentials)), fake.refresh_token_state(new))
        assert ("used", "current") == states

    def test_reused_refresh_token_gets_the_exact_invalid_grant(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Presenting a rotated refresh token again answers 400 with the real invalid_grant body."""
        credentials = fake.issue()
        refresh(client, fake, credentials)

        response = refresh(client, fake, credentials)

        assert (400, INVALID_GRANT) == (response.status_code, response.json())

    def test_unknown_refresh_token_gets_invalid_grant(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A refresh token the provider never issued answers 400 invalid_grant."""
        response = refresh(client, fake, "sk-ant-ort01-never-issued")

        assert (400, INVALID_GRANT) == (response.status_code, response.json())

    def test_answer_parses_into_credentials(self, fake: FakeProvider, client: httpx.Client) -> None:
        """credkeeper's parser reads the answer into the tokens the provider now holds."""
        credentials = fake.issue()
        family = fake.family_of(credentials)
        assert family is not None

        parsed = Credentials.from_token_response(
            refresh(client, fake, credentials).text, now=datetime.now(UTC), previous=credentials
        )

        current = fake.current_credentials(family)
        assert (current.access_token, current.refresh_token) == (
            parsed.access_token,
            parsed.refresh_token,
        )


class TestRevocation:
    def test_reuse_leaves_the_family_alone_by_default(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Without revoke_family_on_reuse a replayed token does not hurt the new tokens."""
        credentials = fake.issue()
        new = refresh(client, fake, credentials).json()
        refresh(client, fake, credentials)

        states = (
            fake.access_token_state(new["access_token"]),
            fake.refresh_token_state(new["refresh_token"]),
        )
        assert ("valid", "current") == states

    def test_reuse_revokes_the_family_access_tokens(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With revoke_family_on_reuse a replayed token revokes the family's access tokens."""
        fake = make_fake(revoke_family_on_reuse=True)
        credentials = fake.issue()
        new = refresh(client, fake, credentials).json()

        refresh(client, fake, credentials)

        assert "revoked" == fake.access_token_state(new["access_token"])

    def test_reuse_revokes_the_family_current_refresh_token(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With revoke_family_on_reuse the winner's refresh token stops working too."""
        fake = make_fake(revoke_family_on_reuse=True)
        credentials = fake.issue()
        new = refresh(client, fake, credentials).json()
        refresh(client, fake, credentials)

        response = refresh(client, fake, new["refresh_token"])

        assert (400, INVALID_GRANT) == (response.status_code, response.json())

    def test_refresh_keeps_earlier_access_tokens_by_default(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Without revoke_previous_access_tokens the old access token lives on until expiry."""
        credentials = fake.issue()

        refresh(client, fake, credentials)

        assert "valid" == fake.access_token_state(credentials.access_token)

    def test_refresh_revokes_earlier_access_tokens_when_asked(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With revoke_previous_access_tokens a refresh kills the old access token, not the new."""
        fake = make_fake(revoke_previous_access_tokens=True)
        credentials = fake.issue()

        new = refresh(client, fake, credentials).json()

        states = (
            fake.access_token_state(credentials.access_token),
            fake.access_token_state(new["access_token"]),
        )
        assert ("revoked", "valid") == states

    def test_revoke_kills_the_family(self, fake: FakeProvider, client: httpx.Client) -> None:
        """revoke() makes the current refresh token answer invalid_grant."""
        credentials = fake.issue()

        fake.revoke(credentials)

        response = refresh(client, fake, credentials)
        assert (400, INVALID_GRANT) == (response.status_code, response.json())

    def test_revoke_marks_tokens_revoked(self, fake: FakeProvider) -> None:
        """revoke() by access token marks both tokens of the family revoked."""
        credentials = fake.issue()

        fake.revoke(credentials.access_token)

        states = (
            fake.access_token_state(credentials.access_token),
            fake.refresh_token_state(credentials.refresh_token),
        )
        assert ("revoked", "revoked") == states

    def test_revoke_of_an_unknown_token_is_a_key_error(self, fake: FakeProvider) -> None:
        """revoke() of a token this fake never issued raises KeyError."""
        with pytest.raises(KeyError, match="not one this FakeProvider issued"):
            fake.revoke("sk-ant-ort01-never-issued")


class TestRequestValidation:
    @pytest.mark.parametrize("missing", ["client_id", "refresh_token", "grant_type"])
    def test_missing_field_gets_invalid_request(
        self, fake: FakeProvider, client: httpx.Client, missing: str
    ) -> None:
        """Leaving out client_id, refresh_token or grant_type answers 400 invalid_request."""
        response = refresh(client, fake, fake.issue(), **{missing: None})

        assert (400, INVALID_REQUEST) == (response.status_code, response.json())

    def test_wrong_client_id_gets_invalid_request(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A client_id other than the configured one answers 400 invalid_request."""
        response = refresh(client, fake, fake.issue(), client_id="someone-else")

        assert (400, INVALID_REQUEST) == (response.status_code, response.json())

    def test_client_id_may_be_optional(self, make_fake: MakeFake, client: httpx.Client) -> None:
        """With require_client_id=False a request without client_id refreshes."""
        fake = make_fake(require_client_id=False)

        response = refresh(client, fake, fake.issue(), client_id=None)

        assert 200 == response.status_code

    def test_other_grant_type_gets_unsupported_grant_type(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """grant_type=authorization_code answers 400 unsupported_grant_type."""
        response = refresh(client, fake, fake.issue(), grant_type="authorization_code")

        assert (400, "unsupported_grant_type") == (response.status_code, response.json()["error"])

    def test_unparseable_json_gets_invalid_request(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A body that does not parse answers 400 invalid_request."""
        response = client.post(
            fake.token_url, content=b"{not json", headers={"Content-Type": "application/json"}
        )

        assert (400, INVALID_REQUEST) == (response.status_code, response.json())

    def test_form_body_is_accepted(self, fake: FakeProvider, client: httpx.Client) -> None:
        """An RFC 6749 form-encoded body refreshes like the JSON one."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": token_of(fake.issue()),
            "client_id": CLIENT_ID,
        }

        response = client.post(fake.token_url, data=form)

        assert (200, "form") == (response.status_code, fake.refresh_calls[-1].body_format)

    def test_basic_client_auth_is_recorded(self, fake: FakeProvider, client: httpx.Client) -> None:
        """HTTP Basic client auth is accepted without a configured secret and recorded."""
        form = {"grant_type": "refresh_token", "refresh_token": token_of(fake.issue())}

        response = client.post(fake.token_url, data=form, auth=(CLIENT_ID, "any-secret"))

        call = fake.refresh_calls[-1]
        assert (200, "client_secret_basic", CLIENT_ID) == (
            response.status_code,
            call.client_auth,
            call.client_id,
        )

    def test_client_secret_post_is_checked_when_configured(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With client_secret set, the right secret in the body refreshes."""
        fake = make_fake(client_secret="s3cret")

        response = refresh(client, fake, fake.issue(), client_secret="s3cret")

        assert (200, "client_secret_post") == (
            response.status_code,
            fake.refresh_calls[-1].client_auth,
        )

    def test_wrong_client_secret_gets_invalid_client(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With client_secret set, a wrong Basic secret answers 401 invalid_client."""
        fake = make_fake(client_secret="s3cret")
        form = {"grant_type": "refresh_token", "refresh_token": token_of(fake.issue())}

        response = client.post(fake.token_url, data=form, auth=(CLIENT_ID, "wrong"))

        assert (401, "invalid_client") == (response.status_code, response.json()["error"])

    def test_missing_client_secret_gets_invalid_client(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """With client_secret set, a request without any secret answers 401 invalid_client."""
        fake = make_fake(client_secret="s3cret")

        response = refresh(client, fake, fake.issue())

        assert (401, "invalid_client") == (response.status_code, response.json()["error"])

    def test_basic_credentials_are_form_decoded(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """Basic credentials are form-decoded before comparison, as RFC 6749 2.3.1 says."""
        fake = make_fake(client_secret="a b:c")
        basic = base64.b64encode(f"{CLIENT_ID}:a+b%3Ac".encode()).decode()
        form = {"grant_type": "refresh_token", "refresh_token": token_of(fake.issue())}

        response = client.post(
            fake.token_url, data=form, headers={"Authorization": f"Basic {basic}"}
        )

        assert 200 == response.status_code


class TestRoutes:
    def test_legacy_route_answers_not_found_error(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """POST /legacy/v1/oauth/token answers the 404 the retired console host gives."""
        response = client.post(fake.url + "/legacy/v1/oauth/token", json={})

        expected = {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}
        assert (404, expected) == (response.status_code, response.json())

    def test_unknown_route_is_not_found(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Any other path answers 404."""
        assert 404 == client.post(fake.url + "/oauth/token", json={}).status_code

    def test_get_on_the_token_url_is_not_found(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Only POST reaches the token endpoint."""
        assert 404 == client.get(fake.token_url).status_code

    def test_other_routes_are_not_logged(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Requests that are not refreshes stay out of refresh_calls."""
        client.post(fake.url + "/legacy/v1/oauth/token", json={})

        assert [] == fake.refresh_calls


class TestStatusFaults:
    def test_429_carries_retry_after(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Fault.status(429, retry_after=7) answers 429 with a Retry-After: 7 header."""
        fake.fail_next(Fault.status(429, retry_after=7))

        response = refresh(client, fake, fake.issue())

        assert (429, "7") == (response.status_code, response.headers["Retry-After"])

    def test_5xx_has_a_json_error_body(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Fault.status(503) answers 503 with an Anthropic-style JSON error body."""
        fake.fail_next(Fault.status(503))

        response = refresh(client, fake, fake.issue())

        assert (503, "error") == (response.status_code, response.json()["type"])

    def test_custom_body_is_sent_verbatim(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Fault.status(502, body=...) sends that body."""
        fake.fail_next(Fault.status(502, body="<html>Bad gateway</html>"))

        response = refresh(client, fake, fake.issue())

        assert (502, "<html>Bad gateway</html>") == (response.status_code, response.text)

    def test_status_fault_does_not_consume_the_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """After a 500 the presented refresh token is still current."""
        credentials = fake.issue()
        fake.fail_next(Fault.status(500))

        refresh(client, fake, credentials)

        assert "current" == fake.refresh_token_state(credentials.refresh_token)

    def test_faults_are_taken_in_order_then_service_resumes(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Queued faults answer one request each, in order; the next request refreshes."""
        credentials = fake.issue()
        fake.fail_next(Fault.status(500), Fault.status(503))

        statuses = [refresh(client, fake, credentials).status_code for _ in range(3)]

        assert [500, 503, 200] == statuses

    def test_clear_faults_drops_the_queue(self, fake: FakeProvider, client: httpx.Client) -> None:
        """clear_faults() empties the schedule, so the next request refreshes."""
        fake.fail_next(Fault.status(500), Fault.status(503))

        dropped = fake.clear_faults()

        assert (2, 0, 200) == (
            dropped,
            fake.pending_faults,
            refresh(client, fake, fake.issue()).status_code,
        )

    def test_status_fault_is_logged_with_its_code(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A 429 fault is logged as outcome fault:429."""
        fake.fail_next(Fault.status(429))

        refresh(client, fake, fake.issue())

        assert ["fault:429"] == [call.outcome for call in fake.refresh_calls]

    def test_out_of_range_status_is_refused(self) -> None:
        """Fault.status() with a code outside 200-599 raises ValueError."""
        with pytest.raises(ValueError, match="between 200 and 599"):
            Fault.status(700)


class TestTimeoutFaults:
    def test_client_with_a_shorter_timeout_gives_up(self, fake: FakeProvider) -> None:
        """Fault.timeout longer than the client's timeout makes httpx raise ReadTimeout."""
        fake.fail_next(Fault.timeout(2.0))

        with http_client(timeout=0.1) as impatient, pytest.raises(httpx.ReadTimeout):
            refresh(impatient, fake, fake.issue())

    def test_timeout_without_consume_keeps_the_token(self, fake: FakeProvider) -> None:
        """A timed-out request without consume leaves the refresh token current."""
        credentials = fake.issue()
        fake.fail_next(Fault.timeout(2.0))

        with http_client(timeout=0.1) as impatient, pytest.raises(httpx.ReadTimeout):
            refresh(impatient, fake, credentials)

        fake.wait_for_calls(1)
        assert "current" == fake.refresh_token_state(credentials.refresh_token)

    def test_timeout_with_consume_rotates_the_token(self, fake: FakeProvider) -> None:
        """A timed-out request with consume=True leaves the client holding a used token."""
        credentials = fake.issue()
        fake.fail_next(Fault.timeout(2.0, consume=True))

        with http_client(timeout=0.1) as impatient, pytest.raises(httpx.ReadTimeout):
            refresh(impatient, fake, credentials)

        fake.wait_for_calls(1)
        assert "used" == fake.refresh_token_state(credentials.refresh_token)

    def test_patient_client_gets_504_without_consume(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A client that outwaits a non-consuming timeout fault gets 504."""
        fake.fail_next(Fault.timeout(0.05))

        assert 504 == refresh(client, fake, fake.issue()).status_code

    def test_patient_client_gets_the_tokens_with_consume(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A client that outwaits a consuming timeout fault gets the normal 200 answer."""
        fake.fail_next(Fault.timeout(0.05, consume=True))

        assert 200 == refresh(client, fake, fake.issue()).status_code

    def test_timeout_is_logged(self, fake: FakeProvider, client: httpx.Client) -> None:
        """A timeout fault is logged as outcome fault:timeout, consumed or not."""
        fake.fail_next(Fault.timeout(0.01, consume=True))

        refresh(client, fake, fake.issue())

        assert [("fault:timeout", True)] == [(c.outcome, c.rotated) for c in fake.refresh_calls]


class TestMalformedAndDropFaults:
    def test_malformed_answers_200_with_a_non_json_body(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Fault.malformed() answers 200 with an HTML body that is not JSON."""
        fake.fail_next(Fault.malformed())

        response = refresh(client, fake, fake.issue())

        assert 200 == response.status_code
        with pytest.raises(json.JSONDecodeError):
            response.json()

    def test_malformed_without_consume_keeps_the_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A malformed answer without consume leaves the refresh token current."""
        credentials = fake.issue()
        fake.fail_next(Fault.malformed())

        refresh(client, fake, credentials)

        assert "current" == fake.refresh_token_state(credentials.refresh_token)

    def test_malformed_with_consume_rotates_the_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A malformed answer with consume=True has rotated the token server-side."""
        credentials = fake.issue()
        fake.fail_next(Fault.malformed(consume=True))

        refresh(client, fake, credentials)

        assert "used" == fake.refresh_token_state(credentials.refresh_token)

    def test_drop_closes_the_connection_without_a_response(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Fault.drop() makes httpx raise RemoteProtocolError."""
        fake.fail_next(Fault.drop())

        with pytest.raises(httpx.RemoteProtocolError):
            refresh(client, fake, fake.issue())

    def test_drop_with_consume_rotates_the_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """A dropped connection with consume=True has rotated the token server-side."""
        credentials = fake.issue()
        fake.fail_next(Fault.drop(consume=True))

        with pytest.raises(httpx.RemoteProtocolError):
            refresh(client, fake, credentials)

        assert "used" == fake.refresh_token_state(credentials.refresh_token)

    def test_malformed_and_drop_are_logged(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Malformed and drop faults are logged as fault:malformed and fault:drop."""
        credentials = fake.issue()
        fake.fail_next(Fault.malformed(), Fault.drop())
        refresh(client, fake, credentials)

        with pytest.raises(httpx.RemoteProtocolError):
            refresh(client, fake, credentials)

        outcomes = [call.outcome for call in fake.refresh_calls]
        assert ["fault:malformed", "fault:drop"] == outcomes


def race(fake: FakeProvider, token: str, *, racers: int = 2) -> list[int]:
    """Send ``racers`` refreshes with one token from separate threads at once; return statuses."""
    barrier = threading.Barrier(racers)
    statuses: list[int] = []

    def run() -> None:
        with http_client() as http:
            barrier.wait()
            statuses.append(refresh(http, fake, token).status_code)

    threads = [threading.Thread(target=run) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


class TestLatency:
    def test_concurrent_refreshes_overlap(self, make_fake: MakeFake) -> None:
        """With latency, two refreshes sent at once are in flight together."""
        fake = make_fake(latency=0.3)

        race(fake, token_of(fake.issue()))

        assert 2 == fake.max_in_flight

    def test_exactly_one_of_two_overlapping_refreshes_wins(self, make_fake: MakeFake) -> None:
        """Two overlapping refreshes with one token: one gets 200, the other invalid_grant."""
        fake = make_fake(latency=0.3)

        statuses = race(fake, token_of(fake.issue()))

        assert ([200, 400], 1) == (sorted(statuses), fake.refresh_count)


class TestLog:
    def test_calls_are_logged_in_order_with_outcomes(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """refresh_calls lists every request's outcome in order."""
        credentials = fake.issue()
        refresh(client, fake, credentials)
        refresh(client, fake, credentials)
        refresh(client, fake, credentials, client_id=None)

        outcomes = [call.outcome for call in fake.refresh_calls]
        assert ["ok", "invalid_grant", "invalid_request"] == outcomes

    def test_refresh_count_counts_only_successes(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """refresh_count is the number of ok outcomes."""
        credentials = fake.issue()
        fake.fail_next(Fault.status(500))
        for _ in range(3):
            refresh(client, fake, credentials)

        assert (3, 1) == (len(fake.refresh_calls), fake.refresh_count)

    def test_call_keeps_the_presented_token_as_a_secret(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """The presented refresh token is logged as a Secret."""
        credentials = fake.issue()

        refresh(client, fake, credentials)

        assert credentials.refresh_token == fake.refresh_calls[0].refresh_token

    def test_call_names_the_family(self, fake: FakeProvider, client: httpx.Client) -> None:
        """Each call names the token family of the presented token."""
        credentials = fake.issue()

        refresh(client, fake, credentials)

        assert fake.family_of(credentials) == fake.refresh_calls[0].family

    def test_call_records_what_the_client_sent(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """Each call records client id, auth method, body format, scope and User-Agent."""
        refresh(client, fake, fake.issue())

        call = fake.refresh_calls[0]
        expected = (
            CLIENT_ID,
            "none",
            "json",
            "user:inference user:profile",
            f"python-httpx/{httpx.__version__}",
        )
        assert expected == (
            call.client_id,
            call.client_auth,
            call.body_format,
            call.scope,
            call.user_agent,
        )

    def test_call_time_comes_from_the_provider_clock(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """RefreshCall.at is the provider clock's time."""
        clock = FakeClock()
        fake = make_fake(clock=clock)
        clock.advance(60)

        refresh(client, fake, fake.issue())

        assert clock.now() == fake.refresh_calls[0].at

    def test_reset_log_forgets_calls_but_not_tokens(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """reset_log() empties refresh_calls; issued tokens keep their state."""
        credentials = fake.issue()
        refresh(client, fake, credentials)

        fake.reset_log()

        assert ([], 0, "used") == (
            fake.refresh_calls,
            fake.refresh_count,
            fake.refresh_token_state(credentials.refresh_token),
        )

    def test_rotate_refreshes_out_of_band(self, fake: FakeProvider) -> None:
        """rotate() consumes the token in-process, returns new credentials and logs the call."""
        credentials = fake.issue()

        rotated = fake.rotate(credentials)

        assert rotated is not None
        assert ("used", "current", 1) == (
            fake.refresh_token_state(credentials.refresh_token),
            fake.refresh_token_state(rotated.refresh_token),
            fake.refresh_count,
        )


class TestTokenState:
    def test_access_token_expires_by_the_provider_clock(self, make_fake: MakeFake) -> None:
        """An access token is valid until the FakeClock passes its lifetime, then expired."""
        clock = FakeClock()
        fake = make_fake(clock=clock, access_token_lifetime=3600)
        credentials = fake.issue()
        before = fake.access_token_state(credentials.access_token)

        clock.advance(3600)

        after = fake.access_token_state(credentials.access_token)
        assert ("valid", "expired") == (before, after)

    def test_refreshed_access_token_lives_from_refresh_time(
        self, make_fake: MakeFake, client: httpx.Client
    ) -> None:
        """A refreshed access token expires a lifetime after the refresh, by the provider clock."""
        clock = FakeClock()
        fake = make_fake(clock=clock, access_token_lifetime=3600)
        credentials = fake.issue()
        clock.advance(3000)
        new = refresh(client, fake, credentials).json()["access_token"]

        clock.advance(3000)

        assert "valid" == fake.access_token_state(new)

    def test_unknown_tokens_are_unknown(self, fake: FakeProvider) -> None:
        """Tokens the fake never issued are unknown."""
        states = (
            fake.access_token_state("sk-ant-oat01-x"),
            fake.refresh_token_state("sk-ant-ort01-x"),
        )
        assert ("unknown", "unknown") == states

    def test_issue_returns_credentials_by_the_provider_clock(self, make_fake: MakeFake) -> None:
        """issue() returns Credentials expiring a lifetime after the clock's now, as asked."""
        clock = FakeClock()
        fake = make_fake(clock=clock)

        credentials = fake.issue(scopes=("user:inference",), subscription_type="pro")

        expected = (clock.now() + timedelta(hours=8), ("user:inference",), "pro")
        actual = (credentials.expires_at, credentials.scopes, credentials.subscription_type)
        assert expected == actual

    def test_issue_with_negative_expires_in_is_already_expired(self, fake: FakeProvider) -> None:
        """issue(expires_in=-1) mints an access token that is already expired."""
        credentials = fake.issue(expires_in=-1)

        assert "expired" == fake.access_token_state(credentials.access_token)

    def test_issue_with_expires_at(self, make_fake: MakeFake) -> None:
        """issue(expires_at=...) mints an access token expiring then."""
        fake = make_fake(clock=FakeClock())
        moment = datetime(2026, 1, 1, 0, 10, tzinfo=UTC)

        assert moment == fake.issue(expires_at=moment).expires_at

    def test_issue_with_naive_expires_at_is_refused(self, fake: FakeProvider) -> None:
        """issue() refuses a naive expires_at and names the fix."""
        with pytest.raises(ValueError, match="naive datetime; pass an aware one"):
            fake.issue(expires_at=datetime(2026, 1, 1))

    def test_all_tokens_lists_every_token_ever_issued(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """all_tokens() holds issued and refreshed tokens, used ones included."""
        credentials = fake.issue()
        new = refresh(client, fake, credentials).json()

        expected = {
            credentials.access_token.get_secret_value(),
            token_of(credentials),
            new["access_token"],
            new["refresh_token"],
        }
        assert expected == fake.all_tokens()

    def test_each_issue_is_a_new_family(self, fake: FakeProvider) -> None:
        """Two logins are two token families."""
        assert fake.family_of(fake.issue()) != fake.family_of(fake.issue())


class TestReprs:
    def test_provider_repr_shows_url_and_counters_but_no_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """repr(FakeProvider) shows the URL and counters and no token."""
        credentials = fake.issue()
        new = refresh(client, fake, credentials).json()

        text = repr(fake)

        assert fake.url in text
        assert "refresh_count=1" in text
        assert "sk-ant-" not in text
        assert new["refresh_token"] not in text

    def test_refresh_call_repr_hides_the_token(
        self, fake: FakeProvider, client: httpx.Client
    ) -> None:
        """repr(RefreshCall) never shows the presented refresh token."""
        refresh(client, fake, fake.issue())

        assert "sk-ant-" not in repr(fake.refresh_calls[0])

    def test_refresh_call_repr_shows_the_outcome(self) -> None:
        """repr(RefreshCall) shows the outcome, for readable assertion failures."""
        call = RefreshCall(
            at=datetime(2026, 1, 1, tzinfo=UTC), outcome="ok", refresh_token=Secret("sk-ant-x")
        )

        assert "outcome='ok'" in repr(call)


class TestLifecycle:
    def test_token_url_is_the_base_url_plus_path(self, fake: FakeProvider) -> None:
        """token_url is url + /v1/oauth/token on 127.0.0.1."""
        assert (True, fake.url + "/v1/oauth/token") == (
            fake.url.startswith("http://127.0.0.1:"),
            fake.token_url,
        )

    def test_stop_closes_the_port(self) -> None:
        """After stop() nothing listens on the port any more."""
        fake = FakeProvider().start()
        port = int(fake.url.rsplit(":", 1)[1])

        fake.stop()

        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_stop_is_idempotent(self) -> None:
        """Calling stop() twice, or before start(), is harmless."""
        fake = FakeProvider()
        fake.stop()
        fake.start()
        fake.stop()
        fake.stop()

        assert "url=None" in repr(fake)

    def test_url_before_start_raises(self) -> None:
        """url raises RuntimeError naming the fix when the server is not running."""
        with pytest.raises(RuntimeError, match=r"call start\(\)"):
            _ = FakeProvider().url

    def test_context_manager_serves_inside_the_block(self, client: httpx.Client) -> None:
        """Inside `with FakeProvider()` the endpoint answers."""
        with FakeProvider() as fake:
            response = refresh(client, fake, fake.issue())

        assert 200 == response.status_code

    def test_stop_drops_requests_still_waiting(self) -> None:
        """stop() returns promptly even while a timeout fault is holding a request."""
        fake = FakeProvider().start()
        fake.fail_next(Fault.timeout(30.0))
        with http_client(timeout=0.1) as impatient, pytest.raises(httpx.ReadTimeout):
            refresh(impatient, fake, fake.issue())

        fake.stop()

        assert "url=None" in repr(fake)


# No server runs for these: the host is never looked up, and the fake is never started.
IN_PROCESS_TOKEN_URL = "https://provider.test/v1/oauth/token"


def in_process(fake: FakeProvider, *, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(fake.handler), timeout=timeout)


def refresh_body(credentials: Credentials) -> dict[str, str]:
    """The JSON body of a Claude Code refresh with ``credentials``."""
    return {
        "grant_type": "refresh_token",
        "refresh_token": token_of(credentials),
        "client_id": CLIENT_ID,
    }


class TestInProcess:
    def test_manager_refreshes_through_the_handler(self, clock: FakeClock) -> None:
        """A TokenManager on a MockTransport client refreshes at an unstarted fake."""
        fake = FakeProvider(clock=clock)
        credentials = fake.issue()
        provider = Provider.claude_code(token_url=IN_PROCESS_TOKEN_URL)
        with (
            in_process(fake) as http,
            TokenManager(MemoryStore(), provider, http=http, clock=clock) as tokens,
        ):
            tokens.put("alice", credentials)

            renewed = tokens.refresh("alice")

        family = fake.family_of(credentials)
        assert family is not None
        assert (1, fake.current_credentials(family)) == (fake.refresh_count, renewed)

    def test_answers_are_the_servers(self, fake: FakeProvider, client: httpx.Client) -> None:
        """The handler answers a reused token with the same status and body as the server."""
        credentials = fake.issue()
        refresh(client, fake, credentials)

        with in_process(fake) as http:
            response = refresh(http, fake, credentials)

        assert (400, INVALID_GRANT) == (response.status_code, response.json())

    def test_unknown_path_is_not_found(self) -> None:
        """In-process, any other path answers 404 as well."""
        with in_process(FakeProvider()) as http:
            response = http.post("https://provider.test/oauth/token", json={})

        assert 404 == response.status_code

    def test_drop_raises_remote_protocol_error(self) -> None:
        """Fault.drop() in-process raises what a dropped connection raises, token consumed."""
        fake = FakeProvider()
        credentials = fake.issue()
        fake.fail_next(Fault.drop(consume=True))

        with in_process(fake) as http, pytest.raises(httpx.RemoteProtocolError):
            http.post(IN_PROCESS_TOKEN_URL, json=refresh_body(credentials))

        assert "used" == fake.refresh_token_state(credentials.refresh_token)

    def test_timeout_past_the_client_timeout_raises_read_timeout(self) -> None:
        """A timeout fault longer than the client's read timeout raises ReadTimeout in-process."""
        fake = FakeProvider()
        credentials = fake.issue()
        fake.fail_next(Fault.timeout(30.0, consume=True))

        with in_process(fake, timeout=0.05) as http, pytest.raises(httpx.ReadTimeout):
            http.post(IN_PROCESS_TOKEN_URL, json=refresh_body(credentials))

        assert [("fault:timeout", True)] == [(c.outcome, c.rotated) for c in fake.refresh_calls]

    def test_timeout_within_the_client_timeout_answers(self) -> None:
        """A shorter timeout fault in-process is waited out and answered, as over a socket."""
        fake = FakeProvider()
        fake.fail_next(Fault.timeout(0.01))

        with in_process(fake) as http:
            response = http.post(IN_PROCESS_TOKEN_URL, json=refresh_body(fake.issue()))

        assert 504 == response.status_code
