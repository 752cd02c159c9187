"""The application's own cipher: credkeeper and a Node.js program read each other's tokens.

``docs/examples/app_cipher/`` holds the guide's ``encrypt(token, SECRET_KEY)`` twice: the
Node.js module an application would use, and the ``TokenCodec`` credkeeper is given. These
tests run the real ``node`` on the values credkeeper stores, and the other way round.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from credkeeper import MemoryStore, Secret, TokenCodec, TokenManager, open_store
from credkeeper.testing import FakeProvider, run_storm
from tests.backends import require_service
from tests.examples import APP_CIPHER, SECRET_KEY, app_cipher, load_app_cipher

KEY = "user-app-cipher"


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable: a failure on CI when it is missing, a skip elsewhere."""
    found = shutil.which("node")
    if found is None:
        require_service("Node.js", ["node on PATH"], "install Node.js 20 (apt-get install nodejs)")
    return found


@pytest.fixture(scope="module")
def codec() -> TokenCodec:
    """The example's AppCipher under the tests' SECRET_KEY."""
    return app_cipher()


def run_node(node: str, command: str, value: str) -> str:
    """``node app_cipher.mjs COMMAND`` on ``value``, with the application's SECRET_KEY."""
    result = subprocess.run(
        [node, str(APP_CIPHER / "app_cipher.mjs"), command],
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
        other = load_app_cipher().AppCipher("another key").seal("t", key=KEY, field="access_token")

        with pytest.raises(ValueError, match="not a value this SECRET_KEY sealed"):
            codec.unseal(other, key=KEY, field="access_token")

    @pytest.mark.slow
    def test_a_process_storm_through_the_codec_refreshes_once(
        self, node: str, codec: TokenCodec, tmp_path: Path
    ) -> None:
        """4 processes x 8 threads on the app's cipher: 1 refresh, all served, the app reads it."""
        url = f"file://{tmp_path / 'credentials.json'}"
        report = run_storm(url, directory=tmp_path, threads=8, codec=app_cipher)
        record = open_store(url).get("storm-user")
        assert record is not None

        assert (1, ("ok",), (), 32) == (
            report.refreshes,
            report.outcomes,
            report.errors,
            report.holding_current,
        )
        # Every caller holds the access token the application itself reads back from the store.
        stored_access = run_node(node, "decrypt", record.access_token)
        assert {hashlib.sha256(stored_access.encode()).hexdigest()} == set(report.tokens_seen)
