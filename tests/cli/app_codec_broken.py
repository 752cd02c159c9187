"""A codec module that fails while it is imported, as one missing its configuration might."""

from __future__ import annotations

from .app_codecs import FACTORY_SECRET

raise RuntimeError(f"no key service configured (tried {FACTORY_SECRET})")
