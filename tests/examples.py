"""The documentation's examples, importable by tests and by the processes storms spawn."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from credkeeper import TokenCodec

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
APP_CIPHER = EXAMPLES / "app_cipher"
SECRET_KEY = "the application's SECRET_KEY"


def load_app_cipher() -> ModuleType:
    """docs/examples/app_cipher/app_cipher.py, imported from where the docs keep it."""
    spec = importlib.util.spec_from_file_location("app_cipher", APP_CIPHER / "app_cipher.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app_cipher"] = module
    spec.loader.exec_module(module)
    return module


def app_cipher() -> TokenCodec:
    """The example's AppCipher under the tests' SECRET_KEY; module-level, for storms to pickle."""
    codec: TokenCodec = load_app_cipher().AppCipher(SECRET_KEY)
    return codec
