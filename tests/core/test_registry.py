"""open_store: from a URL to a store through the credkeeper.stores entry points."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from credkeeper import ConfigurationError, MemoryStore, UnknownSchemeError, open_store
from credkeeper._registry import ENTRY_POINT_GROUP

PROBE_MODULE = "credkeeper_registry_probe"
PROBE_SOURCE = '''
class ProbeStore:
    """A stand-in store that remembers how it was opened."""

    def __init__(self, url, options):
        self.url = url
        self.options = options

    @classmethod
    def from_url(cls, url, **options):
        return cls(url, options)
'''

Register = Callable[[dict[str, str]], None]


@pytest.fixture
def register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Register:
    """Install a throwaway distribution whose entry points join credkeeper.stores."""

    def install(entries: dict[str, str]) -> None:
        (tmp_path / f"{PROBE_MODULE}.py").write_text(PROBE_SOURCE)
        info = tmp_path / f"{PROBE_MODULE}-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {PROBE_MODULE}\nVersion: 0.0\n"
        )
        lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, PROBE_MODULE, raising=False)

    return install


class TestRegistered:
    def test_memory(self) -> None:
        """memory:// opens a new, empty MemoryStore."""
        store = open_store("memory://")

        assert MemoryStore is type(store)

    def test_memory_stores_are_separate(self) -> None:
        """Each memory:// URL opens its own store."""
        assert open_store("memory://") is not open_store("memory://")

    def test_scheme_case_insensitive(self) -> None:
        """The scheme is matched without regard to case."""
        assert MemoryStore is type(open_store("MEMORY://"))

    def test_options_reach_store(self) -> None:
        """Options go to the store's from_url, which refuses ones it does not know."""
        with pytest.raises(ConfigurationError, match="option"):
            open_store("memory://", flavour="x")

    def test_file(self, tmp_path: Path) -> None:
        """file:///path resolves through the file entry point."""
        store = open_store(f"file://{tmp_path / 'creds.json'}")
        try:
            assert "FileStore" == type(store).__name__
        finally:
            store.close()

    def test_part_before_plus(self) -> None:
        """A scheme with a +driver suffix falls back to the part before the +."""
        assert MemoryStore is type(open_store("memory+anything://"))

    def test_full_scheme_first(self, register: Register) -> None:
        """An entry point for the whole scheme wins over the part before the +."""
        register({"memory+probe": f"{PROBE_MODULE}:ProbeStore"})

        store = open_store("memory+probe://x", flag=True)

        assert ("ProbeStore", "memory+probe://x", {"flag": True}) == (
            type(store).__name__,
            store.url,  # type: ignore[union-attr]
            store.options,  # type: ignore[union-attr]
        )

    def test_third_party_scheme(self, register: Register) -> None:
        """A third party registers a scheme through the same entry-point group."""
        register({"probe": f"{PROBE_MODULE}:ProbeStore"})

        assert "ProbeStore" == type(open_store("probe://somewhere")).__name__

    def test_failed_import_names_extra(self, register: Register) -> None:
        """A first-party store whose driver is missing names the extra to install."""
        register({"mongodb+probe": "credkeeper_no_such_module_xyz:Store"})

        with pytest.raises(UnknownSchemeError) as info:
            open_store("mongodb+probe://localhost/db")

        assert ("mongodb+probe", True) == (
            info.value.scheme,
            "credkeeper[mongo]" in str(info.value),
        )

    def test_failed_import_of_third_party(self, register: Register) -> None:
        """A third-party store that fails to import raises UnknownSchemeError naming it."""
        register({"probe": "credkeeper_no_such_module_xyz:Store"})

        with pytest.raises(UnknownSchemeError) as info:
            open_store("probe://x")

        assert ("probe", True) == (
            info.value.scheme,
            "credkeeper_no_such_module_xyz" in str(info.value),
        )


class TestUnknown:
    def test_unknown_scheme(self) -> None:
        """An unknown scheme raises UnknownSchemeError naming it and the registered ones."""
        with pytest.raises(UnknownSchemeError) as info:
            open_store("nosuchdb://localhost:6379/0")

        message = str(info.value)
        assert ("nosuchdb", True, True, True) == (
            info.value.scheme,
            "'nosuchdb'" in message,
            "file" in message,
            "memory" in message,
        )

    def test_is_configuration_error(self) -> None:
        """UnknownSchemeError is a ConfigurationError."""
        with pytest.raises(ConfigurationError):
            open_store("nosuchdb://localhost")

    @pytest.mark.parametrize(
        ("url", "driver", "extra"),
        [
            ("postgresql+psycopg://db.example.com/app", "sqlalchemy", "sql"),
            ("sqlite:///x.db", "sqlalchemy", "sql"),
            ("mongodb://db.example.com/app?collection=creds", "pymongo", "mongo"),
            ("mongodb+srv://cluster.example.com/app", "pymongo", "mongo"),
            ("aws-sm://eu-west-1/credkeeper/", "botocore", "aws"),
        ],
    )
    def test_first_party_store_without_its_driver(self, url: str, driver: str, extra: str) -> None:
        """Without its driver, a first-party store names its scheme and the extra to install.

        The driver is blocked from import in a fresh interpreter (``sys.modules[name] = None``),
        which is how a package that is not installed looks to the import system.
        """
        script = (
            f"import sys\nsys.modules[{driver!r}] = None\n"
            "from credkeeper import UnknownSchemeError, open_store\n"
            f"try:\n    open_store({url!r})\n"
            "except UnknownSchemeError as exc:\n    print(exc.scheme)\n    print(exc)\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )

        lines = completed.stdout.splitlines()
        assert (0, url.split("://", maxsplit=1)[0], True) == (
            completed.returncode,
            lines[0] if lines else completed.stderr,
            f"pip install 'credkeeper[{extra}]'" in completed.stdout,
        )

    @pytest.mark.parametrize(
        "url", ["", "memory", "memory:", "/var/lib/creds.json", "file:/var/lib/creds.json"]
    )
    def test_not_a_url(self, url: str) -> None:
        """A string without :// raises ConfigurationError showing the expected form."""
        with pytest.raises(ConfigurationError, match="scheme://"):
            open_store(url)

    @pytest.mark.parametrize("url", [None, b"memory://", 42])
    def test_not_a_string(self, url: object) -> None:
        """A URL that is not a str raises ConfigurationError."""
        with pytest.raises(ConfigurationError):
            open_store(url)  # type: ignore[arg-type]
