"""The application's own cipher: credkeeper and a Node.js program read each other's tokens.

``docs/examples/app_cipher/`` holds the guide's ``encrypt(token, SECRET_KEY)`` twice: the
Node.js module an application would use, and the ``TokenCodec`` credkeeper is given. These
tests run the real ``node`` on the values credkeeper stores, and the other way round.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from credkeeper import MemoryStore, Secret, TokenCodec, TokenManager
from credkeeper.testing import FakeProvider
from tests.backends import require_service

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "app_cipher"
SECRET_KEY = "the application's SECRET_KEY"
KEY = "user-app-cipher"


def load_example() -> ModuleType:
    """docs/examples/app_cipher/app_cipher.py, imported from where the docs keep it."""
    spec = importlib.util.spec_from_file_location("app_cipher", EXAMPLE / "app_cipher.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app_cipher"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable: a failure on CI when it is missing, a skip elsewhere."""
    found = shutil.which("node")
    if found is None:
        require_service("Node.js", ["node on PATH"], "install Node.js 20 (apt-get install nodejs)")
    return found


@pytest.fixture(scope="module")
def codec() -> TokenCodec:
    """The example's AppCipher under the test's SECRET_KEY."""
    cipher: TokenCodec = load_example().AppCipher(SECRET_KEY)
    return cipher


def run_node(node: str, command: str, value: str) -> str:
    """``node app_cipher.mjs COMMAND`` on ``value``, with the application's SECRET_KEY."""
    result = subprocess.run(
        [node, str(EXAMPLE / "app_cipher.mjs"), command],
        input=value,
        capture_output=True,
        text=True,
        env={**os.environ, "SECRET_KEY": SECRET_KEY},
        timeout=30,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    return result.stdout


class TestAppCipher:
    def test_node_decrypts_what_the_codec_sealed(self, node: str, codec: TokenCodec) -> None:
        """A token sealed by the codec opens with the application's decrypt()."""
        sealed = codec.seal("sk-ant-ort01-example", key=KEY, field="refresh_token")

        assert "sk-ant-ort01-example" == run_node(node, "decrypt", sealed)

    def test_the_codec_opens_what_node_encrypted(self, node: str, codec: TokenCodec) -> None:
        """A token the application encrypted opens with the codec."""
        sealed = run_node(node, "encrypt", "sk-ant-oat01-example")

        assert "sk-ant-oat01-example" == codec.unseal(sealed, key=KEY, field="access_token")

    def test_tokens_credkeeper_refreshed_are_read_by_the_application(
        self, node: str, codec: TokenCodec, tmp_path: Path
    ) -> None:
        """After a refresh through the codec, the app's decrypt() gives the provider's tokens."""
        store = MemoryStore()
        with FakeProvider() as fake:
            tokens = TokenManager(store, fake.provider(), journal=tmp_path / "j", codec=codec)
            tokens.put(KEY, fake.issue(expires_in=0))
            fresh = tokens.get(KEY)
            record = store.get(KEY)
            assert record is not None

            opened = run_node(node, "decrypt", record.refresh_token)

            assert fresh.refresh_token == Secret(opened)
            assert "current" == fake.refresh_token_state(Secret(opened))

    def test_a_wrong_secret_key_is_refused(self, codec: TokenCodec) -> None:
        """A value sealed under another SECRET_KEY does not open."""
        other = load_example().AppCipher("another key").seal("t", key=KEY, field="access_token")

        with pytest.raises(ValueError, match="not a value this SECRET_KEY sealed"):
            codec.unseal(other, key=KEY, field="access_token")
