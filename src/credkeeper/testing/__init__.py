"""Public test tooling for credkeeper and for code built on it.

Fakes that behave like the real systems, over real loopback HTTP: :class:`FakeProvider` (a
rotating OAuth token endpoint with a fault schedule), :class:`FakeWrapper` (the Claude Wrapper
API, checking tokens against a FakeProvider, with its own fault schedule) and :class:`FakeClock`
(time that moves only when a test moves it) and :class:`SkewedClock` (a host's clock
running ahead or behind); :class:`StoreConformance` and
:class:`AsyncStoreConformance`, the suite every store passes (it needs pytest); :func:`run_storm`,
the many-process refresh storm.
Use them in your own tests; they are part of the supported API.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ._clock import FakeClock, SkewedClock
from ._provider import FakeProvider, Fault, RefreshCall
from ._storm import StormReport, run_storm
from ._wrapper import FakeWrapper, WrapperCall, WrapperFault

if TYPE_CHECKING:
    from ._conformance import (
        AsyncStoreConformance,
        BlockingStore,
        KeySpace,
        StoreConformance,
        StoreFactory,
    )

__all__ = [
    "AsyncStoreConformance",
    "BlockingStore",
    "FakeClock",
    "FakeProvider",
    "FakeWrapper",
    "Fault",
    "KeySpace",
    "RefreshCall",
    "SkewedClock",
    "StoreConformance",
    "StoreFactory",
    "StormReport",
    "WrapperCall",
    "WrapperFault",
    "run_storm",
]

_CONFORMANCE = frozenset(
    {"AsyncStoreConformance", "BlockingStore", "KeySpace", "StoreConformance", "StoreFactory"}
)


def __getattr__(name: str) -> Any:
    # The conformance suite is made of pytest classes: import pytest only for those who use it,
    # and register the module first so that its assertions show values when they fail.
    if name in _CONFORMANCE:
        if f"{__name__}._conformance" not in sys.modules:
            import pytest  # noqa: PLC0415

            pytest.register_assert_rewrite(f"{__name__}._conformance")
        from . import _conformance  # noqa: PLC0415

        return getattr(_conformance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
