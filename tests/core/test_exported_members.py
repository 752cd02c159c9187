"""The public surface: ``__all__`` of credkeeper, credkeeper.wrapper and credkeeper.testing.

httpx's idea: each public module's ``__all__`` is sorted and lists every public name it binds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from types import ModuleType

import pytest

import credkeeper
import credkeeper.wrapper

# Dunder names that belong in __all__ although they start with an underscore.
PUBLIC_DUNDERS = {"__version__"}
# Helpers a package imports for its own annotations (a lazy __getattr__ needs Any and
# TYPE_CHECKING); they are not API, so they need not be exported.
TYPING_MODULES = {"typing", "typing_extensions"}


def public_names(module: ModuleType) -> set[str]:
    """Public names bound in a package's namespace, minus submodules and typing helpers."""
    return {
        name
        for name, value in vars(module).items()
        if (not name.startswith("_") or name in PUBLIC_DUNDERS)
        and not isinstance(value, ModuleType)
        and type(value).__module__ != "__future__"  # from __future__ import annotations
        and getattr(value, "__module__", None) not in TYPING_MODULES
        and name != "TYPE_CHECKING"
    }


class TestCredkeeper:
    def test_all_sorted(self) -> None:
        """credkeeper.__all__ is sorted."""
        assert sorted(credkeeper.__all__) == credkeeper.__all__

    def test_all_unique(self) -> None:
        """credkeeper.__all__ names each member once."""
        assert len(set(credkeeper.__all__)) == len(credkeeper.__all__)

    def test_all_importable(self) -> None:
        """Every name in credkeeper.__all__ can be imported from credkeeper."""
        namespace: dict[str, object] = {}
        exec("from credkeeper import *", namespace)  # noqa: S102 - the star import is the subject

        assert [] == [name for name in credkeeper.__all__ if name not in namespace]

    def test_every_public_name_exported(self) -> None:
        """Every public name defined in credkeeper's __init__ is in __all__."""
        assert set() == public_names(credkeeper) - set(credkeeper.__all__)

    def test_version(self) -> None:
        """__version__ is exported and is a string."""
        assert (True, True) == (
            "__version__" in credkeeper.__all__,
            isinstance(credkeeper.__version__, str),
        )

    def test_the_distribution_has_the_package_version(self) -> None:
        """The installed distribution's version is __version__, its one source."""
        assert credkeeper.__version__ == importlib.metadata.version("credkeeper")


class TestWrapper:
    def test_all_sorted(self) -> None:
        """credkeeper.wrapper.__all__ is sorted."""
        assert sorted(credkeeper.wrapper.__all__) == credkeeper.wrapper.__all__

    def test_all_unique(self) -> None:
        """credkeeper.wrapper.__all__ names each member once."""
        assert len(set(credkeeper.wrapper.__all__)) == len(credkeeper.wrapper.__all__)

    def test_all_importable(self) -> None:
        """Every name in credkeeper.wrapper.__all__ can be imported from credkeeper.wrapper."""
        namespace: dict[str, object] = {}
        exec("from credkeeper.wrapper import *", namespace)  # noqa: S102 - the star import is the subject

        assert [] == [name for name in credkeeper.wrapper.__all__ if name not in namespace]

    def test_every_public_name_exported(self) -> None:
        """Every public name bound in credkeeper.wrapper is in its __all__."""
        assert set() == public_names(credkeeper.wrapper) - set(credkeeper.wrapper.__all__)

    def test_shared_names_are_the_same_objects(self) -> None:
        """A name exported by both credkeeper and credkeeper.wrapper is one object, one meaning."""
        shared = set(credkeeper.__all__) & set(credkeeper.wrapper.__all__)

        assert [] == sorted(
            name
            for name in shared
            if getattr(credkeeper, name) is not getattr(credkeeper.wrapper, name)
        )

    def test_top_level_keeps_the_clients_and_the_errors(self) -> None:
        """credkeeper exports the two clients and every wrapper error, and no wrapper value type."""
        wrapper_errors = {
            name
            for name in credkeeper.wrapper.__all__
            if isinstance(getattr(credkeeper.wrapper, name), type)
            and issubclass(getattr(credkeeper.wrapper, name), BaseException)
        }
        expected = wrapper_errors | {"AsyncWrapperClient", "WrapperClient"}

        assert sorted(expected) == sorted(set(credkeeper.__all__) & set(credkeeper.wrapper.__all__))


class TestTesting:
    @pytest.fixture
    def testing(self) -> ModuleType:
        """credkeeper.testing, skipping only while the package or its __all__ does not exist."""
        try:
            module = importlib.import_module("credkeeper.testing")
        except ModuleNotFoundError as exc:
            if exc.name != "credkeeper.testing":
                raise
            pytest.skip("credkeeper.testing does not exist yet")
        if not hasattr(module, "__all__"):
            pytest.skip("credkeeper.testing defines no __all__ yet")
        return module

    def test_all_sorted(self, testing: ModuleType) -> None:
        """credkeeper.testing.__all__ is sorted."""
        assert sorted(testing.__all__) == testing.__all__

    def test_all_importable(self, testing: ModuleType) -> None:
        """Every name in credkeeper.testing.__all__ can be imported from it."""
        namespace: dict[str, object] = {}
        exec("from credkeeper.testing import *", namespace)  # noqa: S102 - the star import is the subject

        assert [] == [name for name in testing.__all__ if name not in namespace]

    def test_every_public_name_exported(self, testing: ModuleType) -> None:
        """Every public name defined in credkeeper.testing's __init__ is in __all__."""
        assert set() == public_names(testing) - set(testing.__all__)


@pytest.mark.parametrize(
    ("cls", "types"),
    [
        (credkeeper.TokenManager, {"store": "CredentialStore", "http": "httpx.Client | None"}),
        (
            credkeeper.AsyncTokenManager,
            {"store": "AsyncCredentialStore | CredentialStore", "http": "httpx.AsyncClient | None"},
        ),
        (credkeeper.WrapperClient, {"tokens": "TokenManager", "http": "httpx.Client | None"}),
        (
            credkeeper.AsyncWrapperClient,
            {"tokens": "AsyncTokenManager", "http": "httpx.AsyncClient | None"},
        ),
    ],
)
def test_twin_classes_show_their_own_types(cls: type, types: dict[str, str]) -> None:
    """A constructor shared through a generic base still shows each class's own types."""
    parameters = inspect.signature(cls).parameters

    assert types == {name: parameters[name].annotation for name in types}
