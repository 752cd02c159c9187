"""``Secret``: a string that never shows itself in ``repr``, ``str`` or formatting."""

from __future__ import annotations

import hmac
from typing import Any

__all__ = ["Secret"]


class Secret:
    """A token value that hides itself.

    ``repr``, ``str`` and f-strings show ``'**********'``; the value comes out only through
    :meth:`get_secret_value`, so it cannot reach a log line or an exception message by accident.
    Equality compares values in constant time; pickling is refused so that a token does not
    travel to another process unnoticed.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value.get_secret_value()
        if not isinstance(value, str):
            raise TypeError(f"a secret must be a str, not {type(value).__name__}")
        self._value = value

    def get_secret_value(self) -> str:
        """The token itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __format__(self, format_spec: str) -> str:
        return format("**********", format_spec)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            # surrogatepass: a value with a lone surrogate must compare, not raise.
            return hmac.compare_digest(
                self._value.encode("utf-8", "surrogatepass"),
                other._value.encode("utf-8", "surrogatepass"),
            )
        return NotImplemented

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled; pass get_secret_value() explicitly")
