"""A store in front of a real one, for code that watches or changes some of a store's calls.

Benchmarks count the calls made through it; the chaos tests make its writes lose races or kill
the process around them. A subclass overrides the methods it changes; the rest go straight
through to the real store.

It lives here because both can import it as it is: the benchmark scripts are run directly
(``python benchmarks/waiters.py``), which puts this directory on ``sys.path`` (hence
``import _forwarding``, like ``_harness``), and pytest puts the repository root on it for the
``tests`` package (hence ``from benchmarks._forwarding import ForwardingStore``), in the chaos
tests' worker processes too. It imports nothing but credkeeper, so the tests pull in no
benchmark machinery with it. It is not in ``credkeeper.testing``: that is public API, and this
serves only the project's own tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from credkeeper import CredentialStore, Record


class ForwardingStore:
    """A :class:`~credkeeper.CredentialStore` that hands every call to ``store``.

    The real store's optional methods, its clock (``now``) and its change notices
    (``changes``), are the wrapper's too, when it has them, so the managers read the same time
    and wake on the same notices through it.
    """

    def __init__(self, store: CredentialStore) -> None:
        self.store = store
        if hasattr(store, "now"):
            self.now = store.now
        if hasattr(store, "changes"):
            self.changes = store.changes

    def get(self, key: str) -> Record | None:
        """The real store's record."""
        return self.store.get(key)

    def put(self, record: Record) -> Record:
        """The real store's compare-and-swap."""
        return self.store.put(record)

    def delete(self, key: str) -> bool:
        """The real store's delete."""
        return self.store.delete(key)

    def scan_due(self, before: datetime) -> Iterator[str]:
        """The real store's scan."""
        return self.store.scan_due(before)

    def close(self) -> None:
        """Close the real store."""
        self.store.close()
