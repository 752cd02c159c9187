"""MemoryStore: the store conformance suite, and what only the in-process store does."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from credkeeper import ConfigurationError, MemoryStore, Record, open_store
from credkeeper.testing import StoreConformance

_EXPIRES = datetime(2031, 1, 1, tzinfo=UTC)


class TestMemoryStore(StoreConformance):
    """Every conformance case; the cross-process ones skip, since nothing leaves the process."""

    def make_store(self) -> MemoryStore:
        return MemoryStore()


class TestFromUrl:
    def test_open_store_resolves_memory_urls(self) -> None:
        """open_store("memory://") returns a MemoryStore, through the entry point."""
        assert MemoryStore is type(open_store("memory://"))

    def test_memory_url_opens_an_empty_store(self) -> None:
        """MemoryStore.from_url("memory://") holds no records."""
        assert "MemoryStore(<0 records>)" == repr(MemoryStore.from_url("memory://"))

    def test_each_url_opens_its_own_store(self) -> None:
        """Two memory:// stores share nothing."""
        first, second = MemoryStore.from_url("memory://"), MemoryStore.from_url("memory://")
        first.put(Record(key="k", access_token="a", refresh_token="r", expires_at=_EXPIRES))
        assert None is second.get("k")

    @pytest.mark.parametrize(
        "url",
        ["memory://localhost", "memory://user@host:1", "memory:///some/path", "memory://?size=3"],
    )
    def test_host_path_or_query_is_refused_naming_the_url(self, url: str) -> None:
        """A memory:// URL with a host, path or query raises ConfigurationError quoting it."""
        with pytest.raises(ConfigurationError, match="takes no host, path or query") as raised:
            MemoryStore.from_url(url)
        assert repr(url) in str(raised.value)

    def test_options_are_refused_naming_them(self) -> None:
        """Keyword options raise ConfigurationError that lists the option names."""
        with pytest.raises(ConfigurationError, match=r"takes no options, got \['create', 'path'\]"):
            MemoryStore.from_url("memory://", path="creds.json", create=True)


class TestRepr:
    def test_repr_shows_no_token(self) -> None:
        """repr() of a store holding credentials contains neither token."""
        store = MemoryStore()
        store.put(
            Record(
                key="user-1",
                access_token="sk-ant-oat01-SECRET-ACCESS",
                refresh_token="sk-ant-ort01-SECRET-REFRESH",
                expires_at=_EXPIRES,
            )
        )
        assert (False, False) == (
            "SECRET-ACCESS" in repr(store),
            "SECRET-REFRESH" in repr(store),
        )

    def test_repr_counts_the_records(self) -> None:
        """repr() says how many records the store holds."""
        store = MemoryStore()
        for key in ("a", "b"):
            store.put(Record(key=key, access_token="x", refresh_token="y", expires_at=_EXPIRES))
        assert "MemoryStore(<2 records>)" == repr(store)
