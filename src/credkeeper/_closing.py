"""Context-manager support shared by the classes that hold connections: ``with x:`` closes ``x``."""

from __future__ import annotations

from typing import Self


class Closing:
    """``with obj: ...`` calls ``obj.close()`` at the end of the block, however it ends."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - every subclass defines its own
        raise NotImplementedError


class AsyncClosing:
    """``async with obj: ...`` awaits ``obj.aclose()`` at the end of the block."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # pragma: no cover - every subclass defines its own
        raise NotImplementedError
