"""What ``credkeeper serve`` tells its operators: Prometheus metrics and the audit log."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from credkeeper import Credentials
from credkeeper.testing import FakeProvider

from .conftest import Service


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- metrics -----------------------------------------------------------------------------


def test_metrics_count_the_refreshes_the_service_made(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """A credential inside the leeway read through the service: one refresh counted, ok."""
    login("alice", expires_in=60)
    with service.client() as client:
        assert 200 == client.get("/v1/users/alice/credentials").status_code
        found = samples(client.get("/metrics").text)
    labels = (("outcome", "ok"), ("result", "succeeded"))
    assert 1.0 == found[("credkeeper_refreshes_total", labels)]


def test_metrics_count_requests_by_route_template_not_by_key(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """Two users' reads are one series, labelled with the route's template."""
    login("alice")
    login("bob")
    with service.client() as client:
        client.get("/v1/users/alice/credentials")
        client.get("/v1/users/bob/credentials")
        text = client.get("/metrics").text
    series = (
        ("method", "GET"),
        ("route", "/v1/users/{key}/credentials"),
        ("status", "200"),
    )
    assert (2.0, False, False) == (
        samples(text)[("credkeeper_http_requests_total", series)],
        "alice" in text,
        "bob" in text,
    )


def test_metrics_report_credentials_by_status(
    service: Service, login: Callable[..., Credentials]
) -> None:
    """Two stored logins: the active gauge says 2."""
    login("alice")
    login("bob")
    with service.client() as client:
        found = samples(client.get("/metrics").text)
    assert 2.0 == found[("credkeeper_credentials", (("status", "active"),))]


def test_unknown_paths_share_one_series(service: Service) -> None:
    """Requests to paths no route matches are labelled "unmatched", never by their path."""
    with service.client() as client:
        client.get("/no/such/path-1")
        client.get("/no/such/path-2")
        text = client.get("/metrics").text
    series = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert (2.0, False) == (
        samples(text)[("credkeeper_http_requests_total", series)],
        "path-1" in text,
    )


def test_unknown_methods_share_one_series(service: Service) -> None:
    """Methods no route takes are labelled "other": a client cannot make new series."""
    with service.client() as client:
        client.request("MKCOL", "/healthz")
        client.request("PROPFIND", "/healthz")
        text = client.get("/metrics").text
    series = (("method", "other"), ("route", "/healthz"), ("status", "405"))
    assert (2.0, False) == (
        samples(text)[("credkeeper_http_requests_total", series)],
        "MKCOL" in text,
    )


def test_metrics_need_the_metrics_scope(
    start_service: Callable[..., Service],
    new_api_key: Callable[..., str],
    api_keys_file: Path,
) -> None:
    """With API keys, /metrics answers 403 to a key without the scope and 200 to one with it."""
    reader = new_api_key("reader", "credentials:read")
    scraper = new_api_key("scraper", "metrics")
    service = start_service("--no-sweep", "--api-keys", str(api_keys_file))
    with service.client(reader) as denied, service.client(scraper) as allowed:
        statuses = (denied.get("/metrics").status_code, allowed.get("/metrics").status_code)
    assert (403, 200) == statuses


# -- audit log ---------------------------------------------------------------------------


def audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_each_credential_call_is_one_audit_line(
    start_service: Callable[..., Service],
    login: Callable[..., Credentials],
    fake: FakeProvider,
    tmp_path: Path,
) -> None:
    """Read, forced refresh, write, delete and a miss: one line each, in order, with outcome."""
    audit = tmp_path / "audit.jsonl"
    service = start_service("--no-sweep", "--audit-log", str(audit))
    login("alice")
    with service.client() as client:
        client.get("/v1/users/alice/credentials")
        client.get("/v1/users/alice/credentials", params={"force": "true"})
        client.put("/v1/users/alice/credentials", json=fake.issue().to_wrapper())
        client.delete("/v1/users/alice/credentials")
        client.get("/v1/users/alice/credentials")
    lines = audit_lines(audit)
    assert [
        ("read", "alice", 200, "ok"),
        ("forced_refresh", "alice", 200, "ok"),
        ("write", "alice", 200, "ok"),
        ("delete", "alice", 204, "ok"),
        ("read", "alice", 404, "credential_not_found"),
    ] == [(line["action"], line["key"], line["status"], line["outcome"]) for line in lines]


def test_an_audit_line_names_the_api_key_and_fingerprints_the_token(
    start_service: Callable[..., Service],
    login: Callable[..., Credentials],
    new_api_key: Callable[..., str],
    api_keys_file: Path,
    tmp_path: Path,
) -> None:
    """A read by API key "app": its name, a 16-digit fingerprint, and no token anywhere."""
    audit = tmp_path / "audit.jsonl"
    key = new_api_key("app", "credentials:read")
    service = start_service(
        "--no-sweep", "--api-keys", str(api_keys_file), "--audit-log", str(audit)
    )
    credentials = login("alice")
    with service.client(key) as client:
        client.get("/v1/users/alice/credentials")
    (line,) = audit_lines(audit)
    text = audit.read_text(encoding="utf-8")
    assert ("app", 16, False, False) == (
        line["api_key"],
        len(str(line["token_fingerprint"])),
        credentials.access_token.get_secret_value() in text,
        key in text,
    )


def test_a_refused_api_key_is_audited(
    start_service: Callable[..., Service],
    new_api_key: Callable[..., str],
    api_keys_file: Path,
    tmp_path: Path,
) -> None:
    """A key of another tenant reading a credential: a line with 403 forbidden_tenant."""
    audit = tmp_path / "audit.jsonl"
    key = new_api_key("tenant", "credentials:read", keys_matching="tenant-a/*")
    service = start_service(
        "--no-sweep", "--api-keys", str(api_keys_file), "--audit-log", str(audit)
    )
    with service.client(key) as client:
        client.get("/v1/users/tenant-b%2Fbob/credentials")
    (line,) = audit_lines(audit)
    assert ("read", "tenant", "tenant-b/bob", 403, "forbidden_tenant") == (
        line["action"],
        line["api_key"],
        line["key"],
        line["status"],
        line["outcome"],
    )


def test_invalid_requests_to_credential_routes_are_audited(
    start_service: Callable[..., Service], tmp_path: Path
) -> None:
    """A bad query, a bad key and a bad body: each one line with 422 validation_failed."""
    audit = tmp_path / "audit.jsonl"
    service = start_service("--no-sweep", "--audit-log", str(audit))
    with service.client() as client:
        client.get("/v1/users/alice/credentials", params={"min_valid": -1})
        client.get("/v1/users/%FF/credentials")
        client.post("/v1/users/alice/credentials/refresh", json={"failed_access_token": 7})
    assert [
        ("read", "alice", 422),
        ("read", "\ufffd", 422),
        ("refresh", "alice", 422),
    ] == [(line["action"], line["key"], line["status"]) for line in audit_lines(audit)]


def test_a_refused_forced_refresh_is_audited_as_one(
    start_service: Callable[..., Service],
    new_api_key: Callable[..., str],
    api_keys_file: Path,
    tmp_path: Path,
) -> None:
    """?force=true by a key without the scope: the line says forced_refresh, 403."""
    audit = tmp_path / "audit.jsonl"
    key = new_api_key("writer", "credentials:write")
    service = start_service(
        "--no-sweep", "--api-keys", str(api_keys_file), "--audit-log", str(audit)
    )
    with service.client(key) as client:
        client.get("/v1/users/alice/credentials", params={"force": "true"})
    (line,) = audit_lines(audit)
    assert ("forced_refresh", "writer", 403) == (line["action"], line["api_key"], line["status"])


def test_every_spelling_of_force_is_audited_as_a_forced_refresh(
    start_service: Callable[..., Service], login: Callable[..., Credentials], tmp_path: Path
) -> None:
    """force=yes, on, t, 1 refresh as force=true does, and are audited so; force=no reads."""
    audit = tmp_path / "audit.jsonl"
    login("alice")
    service = start_service("--no-sweep", "--audit-log", str(audit))
    spellings = ["true", "yes", "on", "t", "1", "no"]
    with service.client() as client:
        for force in spellings:
            client.get("/v1/users/alice/credentials", params={"force": force})
    assert ["forced_refresh"] * 5 + ["read"] == [line["action"] for line in audit_lines(audit)]


def test_a_validation_message_naming_a_token_field_is_not_masked(service: Service) -> None:
    """failed_access_token's problem reads whole: the field's name is not taken for a token."""
    with service.client() as client:
        body = client.post(
            "/v1/users/alice/credentials/refresh", json={"failed_access_token": ""}
        ).json()
    assert "invalid request: failed_access_token (must be a non-empty string)" == body["detail"]
