"""MongoDB announces every write through a change stream, and callers waiting on a peer wake.

Against the MongoDB wire server the suite runs (SecantusDB, or a replica set named by the
environment): stores on one collection, managers with the real clock, a ``FakeProvider``.
"""

from __future__ import annotations

import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from credkeeper import ConfigurationError, open_store
from credkeeper_mongo import MongoStore
from tests.adapters.conftest import record
from tests.adapters.notices import LONG, SeesPeer, connected, heard_after_a_lost_swap, wait_for_peer


@pytest.fixture
def notify_url(mongodb_store_url: str) -> str:
    """A collection of this test's own, so that no other test's writes reach its listeners."""
    return f"{mongodb_store_url}?collection=notify_{uuid.uuid4().hex[:8]}&notify=true"


def listening(url: str) -> MongoStore:
    """A store on ``url`` whose change stream is open: a write made now is heard."""
    store = open_store(url)
    assert isinstance(store, MongoStore)
    with closing(open_store(url)) as writer:
        return connected(store, writer)  # type: ignore[no-any-return]


def test_every_write_is_heard_with_the_version_it_wrote(notify_url: str) -> None:
    """An insert, an update and a delete through one store each reach a listening store, the
    writes with their new versions: a waiter that read a version is not woken by it."""
    with closing(listening(notify_url)) as listener, closing(open_store(notify_url)) as writer:
        notices = listener.changes()
        assert notices is not None
        heard = []
        since = time.monotonic()
        inserted = writer.put(record("alice"))
        heard.append(notices.wait("alice", since=since, seconds=LONG, seen="other"))
        heard.append(notices.wait("alice", since=since, seconds=0.2, seen=inserted.version))
        since = time.monotonic()
        updated = writer.put(inserted)
        heard.append(notices.wait("alice", since=since, seconds=LONG, seen=inserted.version))
        heard.append(notices.wait("alice", since=since, seconds=0.2, seen=updated.version))
        since = time.monotonic()
        writer.delete("alice")
        heard.append(notices.wait("alice", since=since, seconds=LONG, seen=updated.version))

        assert [True, False, True, False, True] == heard


def test_a_lost_compare_and_swap_is_not_heard(notify_url: str) -> None:
    """A put refused for a stale version is rolled back, its notice with it."""
    assert not heard_after_a_lost_swap(notify_url, open_store(notify_url))


@pytest.mark.parametrize("options", ["", "notify=false"], ids=["default", "notify-off"])
def test_without_notify_there_are_no_change_notices(mongodb_store_url: str, options: str) -> None:
    """By default, and with notify=false, callers wait on their schedule."""
    with closing(open_store(f"{mongodb_store_url}?collection=quiet&{options}")) as store:
        assert isinstance(store, MongoStore)

        assert None is store.changes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("field_path=claudeCredentials", "needs credkeeper's own collection"),
        ("async=true", "AsyncMongoStore has no change notices"),
    ],
    ids=["embedded", "async"],
)
def test_notify_where_there_are_no_notices_is_refused(
    notify_url: str, options: str, message: str
) -> None:
    """notify=true with credentials embedded in the application's documents, or on the async
    store, is a ConfigurationError naming why, not an option silently ignored."""
    with pytest.raises(ConfigurationError, match=message):
        open_store(f"{notify_url}&{options}")


def test_a_dropped_collection_is_listened_to_again(notify_url: str) -> None:
    """Dropping the collection ends the change stream; the listener opens it again and hears
    the writes made after."""
    with closing(listening(notify_url)) as listener, closing(open_store(notify_url)) as writer:
        assert isinstance(writer, MongoStore)
        writer.put(record("alice"))
        writer.collection.drop()
        notices = listener.changes()
        assert notices is not None
        heard = False
        deadline = time.monotonic() + LONG
        while not heard and time.monotonic() < deadline:
            since = time.monotonic()
            writer.delete("bob")
            writer.put(record("bob"))
            heard = notices.wait("bob", since=since, seconds=0.5)

        assert heard


@pytest.mark.parametrize("asynchronous", [False, True], ids=["TokenManager", "AsyncTokenManager"])
def test_a_waiter_wakes_when_the_peer_stores_its_tokens(
    asynchronous: bool, notify_url: str, tmp_path: Path
) -> None:
    """A caller waiting on a peer's lease returns the peer's tokens well before its next
    scheduled read (0.9-1 s after its last), woken by the peer's write."""
    with closing(open_store(notify_url)) as writer:
        waiter = connected(SeesPeer(open_store(notify_url)), writer)

    waited, the_peers = wait_for_peer(notify_url, waiter, tmp_path, asynchronous=asynchronous)

    assert (True, True) == (the_peers, waited < 0.5)
