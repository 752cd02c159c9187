"""``credkeeper serve`` over real HTTP: routes, status codes and what never leaves the service."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from credkeeper import Credentials, TokenManager
from credkeeper.testing import FakeProvider, FakeWrapper, Fault, WrapperFault

from .conftest import Service, _leaks

PROBLEM = "application/problem+json"
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}


def tokens_of(credentials: Credentials) -> list[str]:
    return [
        credentials.access_token.get_secret_value(),
        credentials.refresh_token.get_secret_value(),
    ]


# -- health ------------------------------------------------------------------------------


def test_healthz_answers_ok(service: Service) -> None:
    """GET /healthz answers {"status": "ok"}."""
    with service.client() as client:
        assert {"status": "ok"} == client.get("/healthz").json()


def test_readyz_answers_200_when_the_store_and_journal_are_usable(service: Service) -> None:
    """GET /readyz answers 200 while the store answers and the journal is writable."""
    with service.client() as client:
        assert 200 == client.get("/readyz").status_code


def test_readyz_answers_503_when_the_journal_is_unusable(service: Service, tmp_path: Path) -> None:
    """GET /readyz answers 503 not_ready when others can write to the journal, saying when to
    retry as every 503 does, and logs it as every 5xx."""
    journal = tmp_path / "journal"
    journal.mkdir(exist_ok=True)
    journal.chmod(0o777)
    with service.client() as client:
        response = client.get("/readyz")
    assert (503, "not_ready", "5", True) == (
        response.status_code,
        response.json()["code"],
        response.headers.get("Retry-After"),
        "GET /readyz answered 503 not_ready" in service.output(),
    )


def test_a_misconfigured_store_is_the_services_failure_told_in_its_log(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    """A store whose table is missing answers 500 configuration_error, not a 422 blaming the
    caller; neither the answer nor /readyz (open to anyone) names the database, the log does."""
    database = tmp_path / "no-table.db"
    service = start_service("--no-sweep", store=f"sqlite:///{database}")
    with service.client() as client:
        answer = client.get("/v1/users/alice/credentials")
        ready = client.get("/readyz")
    assert (
        (500, "configuration_error", 503),
        [False, False],
        True,
    ) == (
        (answer.status_code, answer.json()["code"], ready.status_code),
        [str(database) in response.text for response in (answer, ready)],
        str(database) in service.output(),
    )


def test_a_key_the_store_cannot_hold_is_the_callers_422(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    """A key that is no value of the application's key column (an INTEGER here) is the caller's
    mistake: 422 naming the key, not the 500 of a misconfigured store."""
    database = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.execute(
            "CREATE TABLE claude_tokens (user_id INTEGER PRIMARY KEY, access_token TEXT, "
            "refresh_token TEXT, expires_at BIGINT)"
        )
        connection.commit()
    columns = "&".join(
        f"{field}_column={field}" for field in ("access_token", "refresh_token", "expires_at")
    )
    store = f"sqlite:///{database}?table=claude_tokens&key_column=user_id&{columns}"
    service = start_service("--no-sweep", store=store)
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert (422, "validation_failed", True) == (
        response.status_code,
        response.json()["code"],
        "user_id" in response.json()["detail"],
    )


# -- credentials -------------------------------------------------------------------------


def test_get_credentials_answers_the_wrapper_object(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """GET .../credentials answers the stored login as the wrapper's oauth_credentials."""
    credentials = login("alice")
    with service.client() as client:
        answer = client.get("/v1/users/alice/credentials").json()
    assert credentials.to_wrapper() == answer["oauth_credentials"]


def test_get_credentials_is_not_cached(service: Service, login: Callable[..., Credentials]) -> None:
    """Answers carrying tokens say Cache-Control: no-store."""
    login("alice")
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert "no-store" == response.headers["cache-control"]


def test_get_credentials_refreshes_a_login_inside_the_leeway(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """Credentials expiring within the leeway are refreshed before they are answered."""
    login("alice", expires_in=60)
    with service.client() as client:
        answer = client.get("/v1/users/alice/credentials").json()
    assert (1, True) == (fake.refresh_count, answer["expires_in"] > 15 * 60)


def test_min_valid_refreshes_credentials_valid_for_less(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """?min_valid=SECONDS refreshes credentials valid for less than that."""
    login("alice", expires_in=3600)
    with service.client() as client:
        client.get("/v1/users/alice/credentials", params={"min_valid": 7200})
    assert 1 == fake.refresh_count


def test_force_refreshes_valid_credentials(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """?force=true refreshes even credentials valid for hours."""
    old = login("alice")
    with service.client() as client:
        answer = client.get("/v1/users/alice/credentials", params={"force": "true"}).json()
    assert (1, False) == (
        fake.refresh_count,
        answer["oauth_credentials"]["access_token"] == tokens_of(old)[0],
    )


def test_refresh_after_a_failed_token_a_peer_replaced_makes_no_provider_call(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider, manager: TokenManager
) -> None:
    """POST .../refresh with a token no longer stored answers the stored one, no refresh."""
    old = login("alice")
    current = manager.refresh("alice")
    fake.reset_log()
    with service.client() as client:
        answer = client.post(
            "/v1/users/alice/credentials/refresh",
            json={"failed_access_token": old.access_token.get_secret_value()},
        ).json()
    assert (0, current.to_wrapper()) == (fake.refresh_count, answer["oauth_credentials"])


def test_put_answers_201_for_a_new_credential(service: Service, fake: FakeProvider) -> None:
    """PUT of a login under a new key answers 201."""
    with service.client() as client:
        response = client.put("/v1/users/bob/credentials", json=fake.issue().to_wrapper())
    assert 201 == response.status_code


def test_put_answers_200_when_it_replaces_one(
    service: Service, fake: FakeProvider, login: Callable[..., Credentials]
) -> None:
    """PUT over an existing credential answers 200."""
    login("bob")
    with service.client() as client:
        response = client.put("/v1/users/bob/credentials", json=fake.issue().to_claude_code())
    assert 200 == response.status_code


def test_puts_racing_to_create_a_key_answer_one_201(service: Service, fake: FakeProvider) -> None:
    """Eight PUTs of logins under one new key at once: the one whose write created it answers
    201, the others 200, as the compare-and-swap decided."""
    logins = [fake.issue().to_wrapper() for _ in range(8)]
    start = threading.Barrier(len(logins))

    def put(body: dict[str, object]) -> int:
        with service.client() as client:
            start.wait(30)
            return client.put("/v1/users/racer/credentials", json=body).status_code

    with ThreadPoolExecutor(len(logins)) as pool:
        statuses = sorted(pool.map(put, logins))
    assert [200] * 7 + [201] == statuses


def test_put_answers_the_state_without_a_token(service: Service, fake: FakeProvider) -> None:
    """PUT answers the credential's state, and neither of the tokens it stored."""
    credentials = fake.issue()
    with service.client() as client:
        text = client.put("/v1/users/bob/credentials", json=credentials.to_wrapper()).text
    assert [False, False] == [token in text for token in tokens_of(credentials)]


def test_put_stores_a_claude_code_document(
    service: Service, fake: FakeProvider, manager: TokenManager
) -> None:
    """PUT takes Claude Code's {"claudeAiOauth": {...}} document."""
    credentials = fake.issue()
    with service.client() as client:
        client.put("/v1/users/bob/credentials", json=credentials.to_claude_code())
    assert credentials.to_wrapper() == manager.get("bob").to_wrapper()


def test_put_names_the_missing_field(service: Service) -> None:
    """A login without its refresh token answers 422 naming refresh_token."""
    body = {"access_token": "sk-ant-oat01-" + "a" * 40, "expires_at": 1_900_000_000_000}
    with service.client() as client:
        problem = client.put("/v1/users/bob/credentials", json=body).json()
    assert ["refresh_token"] == [error["field"] for error in problem["errors"]]


def test_delete_answers_204(service: Service, login: Callable[..., Credentials]) -> None:
    """DELETE of a stored credential answers 204."""
    login("alice")
    with service.client() as client:
        assert 204 == client.delete("/v1/users/alice/credentials").status_code


def test_an_unknown_key_answers_404_credential_not_found(service: Service) -> None:
    """A key with no credential answers 404 credential_not_found as problem+json."""
    with service.client() as client:
        response = client.get("/v1/users/nobody/credentials")
    assert (404, PROBLEM, "credential_not_found") == (
        response.status_code,
        response.headers["content-type"],
        response.json()["code"],
    )


def test_a_refused_refresh_token_answers_409_reauth_required(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """A credential whose refresh token the provider refuses answers 409 reauth_required."""
    credentials = login("alice", expires_in=-10)
    fake.revoke(credentials)
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert (409, "reauth_required") == (response.status_code, response.json()["code"])


def test_a_throttling_provider_answers_503_with_retry_after(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """A provider answering 503 with Retry-After makes 503 provider_unavailable with it."""
    login("alice", expires_in=-10)
    fake.fail_next(*[Fault.status(503, retry_after=3600)] * 5)
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert (503, "provider_unavailable", "3600") == (
        response.status_code,
        response.json()["code"],
        response.headers.get("retry-after"),
    )


def test_a_key_with_a_slash_works_percent_encoded(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """A key holding '/' is one path segment once percent-encoded."""
    credentials = login("tenant/alice")
    with service.client() as client:
        answer = client.get("/v1/users/tenant%2Falice/credentials").json()
    assert credentials.to_wrapper() == answer["oauth_credentials"]


def test_an_invalid_query_answers_422_naming_the_field(service: Service) -> None:
    """An invalid query parameter answers 422 with the field named."""
    with service.client() as client:
        problem = client.get("/v1/users/alice/credentials", params={"min_valid": "soon"}).json()
    assert (422, ["min_valid"]) == (
        problem["status"],
        [error["field"] for error in problem["errors"]],
    )


def test_a_body_above_the_limit_answers_413(start_service: Callable[..., Service]) -> None:
    """A request body larger than --max-body-bytes answers 413."""
    service = start_service("--no-sweep", "--max-body-bytes", "100")
    with service.client() as client:
        response = client.put("/v1/users/bob/credentials", content=b"{" + b" " * 200 + b"}")
    assert (413, "body_too_large") == (response.status_code, response.json()["code"])


def test_a_chunked_body_above_the_limit_answers_413(
    start_service: Callable[..., Service],
) -> None:
    """A body sent in chunks, without Content-Length, is cut off at the limit with 413."""
    service = start_service("--no-sweep", "--max-body-bytes", "100")

    def chunks() -> Iterator[bytes]:
        yield from [b" " * 50] * 4

    with service.client() as client:
        response = client.put("/v1/users/bob/credentials", content=chunks())
    assert (413, "body_too_large") == (response.status_code, response.json()["code"])


# -- users -------------------------------------------------------------------------------


def test_user_state_holds_no_token(service: Service, login: Callable[..., Credentials]) -> None:
    """GET /v1/users/{key} answers the state and neither token."""
    credentials = login("alice")
    with service.client() as client:
        text = client.get("/v1/users/alice").text
    assert ([False, False], "active") == (
        [token in text for token in tokens_of(credentials)],
        json.loads(text)["status"],
    )


def test_users_are_listed_in_pages(service: Service, login: Callable[..., Credentials]) -> None:
    """GET /v1/users pages through every key with the cursor it answers."""
    for name in ("a", "b", "c"):
        login(name)
    seen: list[str] = []
    with service.client() as client:
        params: dict[str, str | int] = {"limit": 2}
        while True:
            page = client.get("/v1/users", params=params).json()
            seen += [user["key"] for user in page["users"]]
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
    assert ["a", "b", "c"] == seen


@pytest.mark.parametrize("cursor", ["@@", "!!", "~", "YQ=="])
def test_a_cursor_the_service_did_not_make_is_refused(
    service: Service, login: Callable[..., Credentials], cursor: str
) -> None:
    """A cursor with characters no cursor has is a 422 naming it, not page one again."""
    login("a")
    with service.client() as client:
        response = client.get("/v1/users", params={"cursor": cursor})
    assert (422, ["cursor"]) == (
        response.status_code,
        [error["field"] for error in response.json()["errors"]],
    )


def test_users_filter_by_status(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """GET /v1/users?status=needs_reauth lists only who must log in again."""
    login("fine")
    revoked = login("gone", expires_in=-10)
    fake.revoke(revoked)
    with service.client() as client:
        client.get("/v1/users/gone/credentials")
        page = client.get("/v1/users", params={"status": "needs_reauth"}).json()
    assert ["gone"] == [user["key"] for user in page["users"]]


# -- messages ----------------------------------------------------------------------------


def test_messages_answer_the_wrappers_body(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """POST .../messages answers the wrapper's JSON reply."""
    login("alice")
    with service.client() as client:
        answer = client.post("/v1/users/alice/messages", json=HELLO).json()
    assert "You said: Hello" == answer["content"][0]["text"]


def test_messages_retry_once_after_the_wrapper_refuses_the_token(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """A revoked access token costs one refresh and no error to the caller."""
    credentials = login("alice")
    fake.revoke_access_token(credentials)
    with service.client() as client:
        response = client.post("/v1/users/alice/messages", json=HELLO)
    assert (200, 1) == (response.status_code, fake.refresh_count)


def test_messages_refuse_a_body_carrying_credentials(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """A messages body with oauth_credentials answers 422 naming that field."""
    credentials = login("alice")
    body = {**HELLO, "oauth_credentials": credentials.to_wrapper()}
    with service.client() as client:
        problem = client.post("/v1/users/alice/messages", json=body).json()
    assert ["oauth_credentials"] == [error["field"] for error in problem["errors"]]


def test_messages_name_each_invalid_field(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """A messages body breaking the wrapper's rules answers 422 naming each field."""
    login("alice")
    body = {"messages": [{"role": "system", "content": 3}]}
    with service.client() as client:
        problem = client.post("/v1/users/alice/messages", json=body).json()
    assert ["messages.0.role", "messages.0.content"] == [e["field"] for e in problem["errors"]]


def test_a_usage_limit_answers_429(
    service: Service, login: Callable[..., Credentials], wrapper: FakeWrapper
) -> None:
    """The wrapper reporting a usage limit answers 429 usage_limit_reached."""
    login("alice")
    wrapper.fail_next(WrapperFault.cli_error(FakeWrapper.OPUS_WEEKLY_LIMIT))
    with service.client() as client:
        response = client.post("/v1/users/alice/messages", json=HELLO)
    assert (429, "usage_limit_reached") == (response.status_code, response.json()["code"])


def test_a_wrapper_failure_answers_502_without_the_tokens_it_echoed(
    service: Service, login: Callable[..., Credentials], wrapper: FakeWrapper
) -> None:
    """A wrapper 500 echoing the tokens answers 502 with neither token in the body."""
    credentials = login("alice")
    wrapper.fail_next(WrapperFault.cli_timeout())
    with service.client() as client:
        response = client.post("/v1/users/alice/messages", json=HELLO)
    assert (502, [False, False]) == (
        response.status_code,
        [token in response.text for token in tokens_of(credentials)],
    )


def test_a_wrapper_cli_error_answers_502_wrapper_error(
    service: Service, login: Callable[..., Credentials], wrapper: FakeWrapper
) -> None:
    """A CLI failure that is neither auth nor a limit answers 502 wrapper_error."""
    login("alice")
    wrapper.fail_next(WrapperFault.cli_error("Something broke"))
    with service.client() as client:
        response = client.post("/v1/users/alice/messages", json=HELLO)
    assert (502, "wrapper_error") == (response.status_code, response.json()["code"])


# -- API keys ----------------------------------------------------------------------------


@pytest.fixture
def keyed(
    start_service: Callable[..., Service], new_api_key: Callable[..., str], api_keys_file: Path
) -> tuple[Service, dict[str, str]]:
    """The service with API keys: a reader, a writer, and a reader of tenant-a only."""
    keys = {
        "reader": new_api_key("reader", "credentials:read"),
        "writer": new_api_key("writer", "credentials:write"),
        "tenant": new_api_key("tenant", "credentials:read", keys_matching="tenant-a/*"),
    }
    return start_service("--no-sweep", "--api-keys", str(api_keys_file)), keys


def test_a_missing_api_key_answers_401_with_the_bearer_challenge(
    keyed: tuple[Service, dict[str, str]],
) -> None:
    """A request without an API key answers 401 with WWW-Authenticate: Bearer."""
    service, _ = keyed
    with service.client() as client:
        response = client.get("/v1/users/alice/credentials")
    assert (401, "Bearer") == (response.status_code, response.headers["www-authenticate"])


def test_an_unknown_api_key_answers_401(keyed: tuple[Service, dict[str, str]]) -> None:
    """A request with a key not in the file answers 401."""
    service, _ = keyed
    with service.client("ck_not-a-key") as client:
        assert 401 == client.get("/v1/users/alice/credentials").status_code


def test_a_key_without_the_scope_answers_403(keyed: tuple[Service, dict[str, str]]) -> None:
    """A key lacking the route's scope answers 403 forbidden_scope."""
    service, keys = keyed
    with service.client(keys["writer"]) as client:
        response = client.get("/v1/users/alice/credentials")
    assert (403, "forbidden_scope") == (response.status_code, response.json()["code"])


def test_a_key_of_another_tenant_answers_403(keyed: tuple[Service, dict[str, str]]) -> None:
    """A key limited to one tenant's keys answers 403 forbidden_tenant for another's."""
    service, keys = keyed
    with service.client(keys["tenant"]) as client:
        response = client.get("/v1/users/tenant-b%2Falice/credentials")
    assert (403, "forbidden_tenant") == (response.status_code, response.json()["code"])


def test_a_key_reads_its_own_tenant(
    keyed: tuple[Service, dict[str, str]], login: Callable[..., Credentials]
) -> None:
    """A tenant's key reads credentials whose keys match its glob."""
    service, keys = keyed
    login("tenant-a/alice")
    with service.client(keys["tenant"]) as client:
        assert 200 == client.get("/v1/users/tenant-a%2Falice/credentials").status_code


def test_health_needs_no_api_key(keyed: tuple[Service, dict[str, str]]) -> None:
    """/healthz answers without an API key when keys are required elsewhere."""
    service, _ = keyed
    with service.client() as client:
        assert 200 == client.get("/healthz").status_code


def test_the_api_document_lists_every_route(service: Service) -> None:
    """GET /openapi.json lists the routes of the service."""
    with service.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/users",
        "/v1/users/{key}",
        "/v1/users/{key}/credentials",
        "/v1/users/{key}/credentials/refresh",
        "/v1/users/{key}/messages",
    } == set(paths)


def test_an_unknown_route_answers_a_problem(service: Service) -> None:
    """A path no route serves answers 404 not_found as problem+json."""
    with service.client() as client:
        response = client.get("/v2/nothing")
    assert (404, PROBLEM, "not_found") == (
        response.status_code,
        response.headers["content-type"],
        response.json()["code"],
    )


def test_the_leak_check_flags_a_token_outside_the_credential_routes(
    service: Service, login: Callable[..., Credentials], fake: FakeProvider
) -> None:
    """The suite's leak check passes a credential route's answer and flags the same body
    answered on another route."""
    login("alice")
    with service.client() as client:
        answer = client.get("/v1/users/alice/credentials")
    elsewhere = httpx.Response(
        200, content=answer.content, request=httpx.Request("GET", service.url + "/v1/users/alice")
    )
    clean = _leaks(service, fake.all_tokens())
    service.responses.append(elsewhere)
    flagged = _leaks(service, fake.all_tokens())
    service.responses.remove(elsewhere)  # planted here: no leak of the service's

    assert ([], ["the answer to GET /v1/users/alice"]) == (clean, flagged)
