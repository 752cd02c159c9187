"""The Redis store of docs/examples/redis_store keeps credkeeper's contract against a real Redis.

It runs the whole conformance suite, sync and async, cross-process cases included, and the
refresh storm (4 processes x 16 threads). The server is found by the rule of
``tests/backends.py``: ``CREDKEEPER_TEST_REDIS_URL``, else 127.0.0.1:6379; unreachable, it is a
failure on CI and a skip elsewhere. Every key this session writes starts with a prefix of its
own, and all of them are deleted at the end, so the tests can share a database with anything.

This directory has no ``__init__.py`` on purpose: ``tests/examples.py`` is a module the other
tests import as ``tests.examples``, and a package of that name would hide it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import redis
from credkeeper_redis_example import AsyncRedisStore, RedisStore
from tests.backends import CONNECT_TIMEOUT, _scrubbed, hide_password, require_service

from credkeeper import (
    AsyncCredentialStore,
    ConfigurationError,
    CredentialStore,
    Record,
    StoreCorrupted,
    StoreUnavailable,
    open_store,
)
from credkeeper.testing import AsyncStoreConformance, StoreConformance, StoreFactory, run_storm

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "custom-stores.md"
BEFORE = datetime(2030, 1, 1, tzinfo=UTC)


def probe_redis(url: str) -> str | None:
    """``PING`` the Redis server at *url*: ``None`` if it answers, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError) as exc:
        return _scrubbed(f"{type(exc).__name__}: {exc}", url)[:300]
    return None


ENV_VAR = "CREDKEEPER_TEST_REDIS_URL"
LOCAL_URL = "redis://127.0.0.1:6379/0"
HOW_TO_START = (
    f"redis-server --daemonize yes (Debian: apt-get install redis-server); or set {ENV_VAR}"
)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the Redis database the tests share with whatever else uses it.

    The rule of ``tests/backends.py`` without its Docker route, as docker/compose.yaml has no
    Redis: the URL in ``CREDKEEPER_TEST_REDIS_URL``, which must answer, else the local server.
    """
    explicit = os.environ.get(ENV_VAR, "")
    if explicit:
        problem = probe_redis(explicit)
        if problem is not None:
            pytest.fail(
                f"{ENV_VAR}={hide_password(explicit)} cannot be reached: {problem}", pytrace=False
            )
        return explicit
    problem = probe_redis(LOCAL_URL)
    if problem is not None:
        require_service("Redis", [f"{ENV_VAR} is not set", f"{LOCAL_URL}: {problem}"], HOW_TO_START)
    return LOCAL_URL


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """This session's key prefix; every key under it is deleted at the end."""
    prefix = f"ck-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for name in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(name)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_store_url(redis_url: str, redis_prefix: str) -> str:
    """The store URL of this session: the database and its prefix."""
    return f"{redis_url}?prefix={redis_prefix}"


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client, for looking at and damaging what the store wrote."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def record(key: str, **changes: object) -> Record:
    """A never-stored record under ``key``, expiring at ``BEFORE`` unless ``changes`` say."""
    fields: dict[str, object] = {
        "key": key,
        "access_token": "access-token",
        "refresh_token": "refresh-token",
        "expires_at": BEFORE,
        **changes,
    }
    return Record(**fields)  # type: ignore[arg-type]


# -- the conformance suite ----------------------------------------------------------------------


class TestRedisStore(StoreConformance):
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, redis_store_url: str) -> None:
        """This session's database and prefix."""
        self.url = redis_store_url

    def make_store(self) -> CredentialStore:
        store = open_store(self.url)
        assert isinstance(store, RedisStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


class TestAsyncRedisStore(AsyncStoreConformance):
    url: str

    @pytest.fixture(autouse=True)
    def backend(self, redis_store_url: str) -> None:
        """This session's database and prefix, through redis.asyncio."""
        self.url = f"{redis_store_url}&async=true"

    def make_async_store(self) -> AsyncCredentialStore:
        store = open_store(self.url)
        assert isinstance(store, AsyncRedisStore)
        return store

    def store_factory(self) -> StoreFactory:
        return functools.partial(open_store, self.url)


# -- registering and opening --------------------------------------------------------------------


def test_the_redis_scheme_is_registered_as_an_entry_point() -> None:
    """The installed example registers RedisStore for the redis scheme."""
    found = {entry.name: entry.value for entry in entry_points(group="credkeeper.stores")}
    assert "credkeeper_redis_example:RedisStore" == found.get("redis")


def test_open_store_of_a_redis_url_opens_a_redis_store(redis_store_url: str) -> None:
    """open_store("redis://...") goes through the entry point to a RedisStore."""
    store = open_store(redis_store_url)
    store.close()
    assert RedisStore is type(store)


def test_async_true_opens_an_async_redis_store(redis_store_url: str) -> None:
    """open_store("redis://...?async=true") opens an AsyncRedisStore."""
    store = open_store(f"{redis_store_url}&async=true")
    asyncio.run(store.close())  # type: ignore[arg-type]
    assert AsyncRedisStore is type(store)


def test_an_unknown_option_is_a_configuration_error(redis_store_url: str) -> None:
    """An option the store does not know is refused when the store is opened."""
    with pytest.raises(ConfigurationError, match="unknown Redis store option"):
        open_store(f"{redis_store_url}&colour=blue")


# -- what the example adds to the suite ---------------------------------------------------------


def test_prefixes_keep_stores_apart(redis_url: str, redis_prefix: str) -> None:
    """One key stored under two prefixes of one database is two credentials."""
    key = f"shared-{uuid.uuid4().hex[:8]}"
    with (
        RedisStore(redis_url, prefix=f"{redis_prefix}a:") as first,
        RedisStore(redis_url, prefix=f"{redis_prefix}b:") as second,
    ):
        first.put(record(key, access_token="first"))
        second.put(record(key, access_token="second"))
        stored = [first.get(key), second.get(key)]
    assert ["first", "second"] == [item and item.access_token for item in stored]


def test_scan_due_misses_no_key_that_a_sweeper_refreshes_during_the_scan(
    redis_store_url: str,
) -> None:
    """Keys moved out of the due range while scan_due pages through them never shift others out."""
    with RedisStore(redis_store_url, page_size=3) as store:
        scope = f"sweep-{uuid.uuid4().hex[:8]}-"
        due = [store.put(record(f"{scope}{index:02d}", expires_at=BEFORE)) for index in range(20)]
        seen = []
        for key in store.scan_due(BEFORE):
            if key.startswith(scope):
                seen.append(key)
                current = store.get(key)
                assert current is not None
                store.put(current.replace(expires_at=BEFORE + timedelta(hours=8)))
    assert sorted(item.key for item in due) == sorted(seen)


def test_scan_due_yields_each_key_once_when_many_share_one_expiry(redis_store_url: str) -> None:
    """Keys tied on one expiry across several pages, some deleted mid-scan, come back once each."""
    with RedisStore(redis_store_url, page_size=4) as store:
        scope = f"tied-{uuid.uuid4().hex[:8]}-"
        keys = [store.put(record(f"{scope}{index:02d}")).key for index in range(17)]
        seen = []
        for key in store.scan_due(BEFORE):
            if key.startswith(scope):
                seen.append(key)
                store.delete(key)
    assert keys == sorted(seen)


def test_an_unreachable_server_is_store_unavailable() -> None:
    """A server that refuses the connection makes get() raise StoreUnavailable."""
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]
        with (
            RedisStore(f"redis://127.0.0.1:{port}/0", timeout=1) as store,
            pytest.raises(StoreUnavailable),
        ):
            store.get("key")


def test_an_error_never_shows_the_urls_password() -> None:
    """The StoreUnavailable of an unreachable server keeps the URL's password out of its text."""
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        port = idle.getsockname()[1]
        store = RedisStore(f"redis://app:s3cret-pa55@127.0.0.1:{port}/0", timeout=1)
        with store, pytest.raises(StoreUnavailable) as raised:
            store.get("key")
    assert ("s3cret-pa55" in str(raised.value), "s3cret" in repr(store)) == (False, False)


def test_a_key_holding_something_else_is_store_corrupted(
    redis_store_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    """get() of a key whose Redis key holds a string, not the store's hash, is StoreCorrupted."""
    key = f"foreign-{uuid.uuid4().hex[:8]}"
    raw.set(f"{redis_prefix}record:{key}", "not a hash")
    with RedisStore(redis_store_url) as store, pytest.raises(StoreCorrupted) as raised:
        store.get(key)
    assert key == raised.value.key


def test_a_damaged_document_is_store_corrupted(
    redis_store_url: str, redis_prefix: str, raw: redis.Redis
) -> None:
    """get() of a record whose document is not JSON raises StoreCorrupted naming the key."""
    key = f"damaged-{uuid.uuid4().hex[:8]}"
    raw.hset(f"{redis_prefix}record:{key}", mapping={"version": "1", "document": "{oops"})
    with RedisStore(redis_store_url) as store, pytest.raises(StoreCorrupted) as raised:
        store.get(key)
    assert key == raised.value.key


# -- the guide ----------------------------------------------------------------------------------

EXCERPT = re.compile(
    r"<!-- not run: an excerpt of (?P<path>\S+) -->\n```\w+\n(?P<body>.*?)\n```", re.DOTALL
)


def quoted_as_is(body: str, source: str) -> bool:
    """Whether ``body`` appears in ``source`` at some indentation, blank lines left blank."""
    body = textwrap.dedent(body)
    return any(
        textwrap.indent(body, " " * width, lambda line: bool(line.strip())) in source
        for width in (0, 4, 8)
    )


def test_the_guide_quotes_the_example_as_it_is() -> None:
    """Every excerpt in docs/custom-stores.md is found, as written, in the file it names."""
    excerpts = list(EXCERPT.finditer(GUIDE.read_text(encoding="utf-8")))
    stale = [
        f"{match['path']}: {match['body'].splitlines()[0]}"
        for match in excerpts
        if not quoted_as_is(match["body"], (ROOT / match["path"]).read_text(encoding="utf-8"))
    ]
    assert (True, []) == (len(excerpts) > 10, stale)


def test_the_guides_contract_names_every_case_of_the_suite() -> None:
    """The guide's rule-by-rule table names exactly the conformance suite's cases."""
    text = GUIDE.read_text(encoding="utf-8")
    table = text.split("## The contract, rule by rule", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_[a-z_]+)`", table))
    cases = {name for name in dir(AsyncStoreConformance) if name.startswith("test_")}
    assert sorted(cases) == sorted(named)


# -- the storm ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(20))
def test_storm_on_redis_refreshes_once(
    repetition: int, redis_store_url: str, tmp_path: Path
) -> None:
    """64 callers through the Redis store: 1 refresh, 0 errors, all hold the new token."""
    report = run_storm(redis_store_url, directory=tmp_path, key=f"storm-{uuid.uuid4().hex[:8]}")
    assert (1, ("ok",), (), 64, 64) == (
        report.refreshes,
        report.outcomes,
        report.errors,
        report.callers,
        report.holding_current,
    )
