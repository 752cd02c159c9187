"""The application's own cipher: credkeeper and a Node.js program read each other's tokens.

``docs/examples/app_cipher/`` holds the guide's ``encrypt(token, SECRET_KEY)`` twice: the
Node.js module an application would use, and the ``TokenCodec`` credkeeper is given. These
tests run the real ``node`` on the values credkeeper stores, and the other way round; on
PostgreSQL and MariaDB, the application's ``tokens.mjs`` reads and writes the very row
credkeeper's manager keeps, through the ``pg`` and ``mysql2`` drivers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from credkeeper import (
    CredentialStore,
    MemoryStore,
    Secret,
    TokenCodec,
    TokenManager,
    open_store,
)
from credkeeper.testing import FakeClock, FakeProvider, run_storm
from tests.adapters.sql.apptables import MAPPING, AppTable, create_table, database_url
from tests.backends import require_service
from tests.examples import APP_CIPHER, SECRET_KEY, app_cipher, load_app_cipher

KEY = "user-app-cipher"
NPM_CI = "npm ci --prefix docs/examples/app_cipher --no-audit --no-fund"


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


@pytest.fixture(scope="module")
def node_modules(node: str) -> Path:
    """The example's drivers (pg, mysql2): a failure on CI when not installed, a skip elsewhere."""
    installed = APP_CIPHER / "node_modules"
    missing = [
        name for name in ("pg", "mysql2") if not (installed / name / "package.json").is_file()
    ]
    if missing:
        require_service(
            "docs/examples/app_cipher/node_modules",
            [f"{' and '.join(missing)} not installed there"],
            f"{NPM_CI} (make test runs it when npm is on PATH)",
        )
    return installed


def accounts_columns(backend: str) -> str:
    """The guide's accounts table: tokens the app encrypts, a timestamp expiry, JSON scopes."""
    expiry = "TIMESTAMPTZ" if backend == "postgresql" else "DATETIME(3) NULL"
    return (
        "id VARCHAR(64) NOT NULL PRIMARY KEY, plan VARCHAR(20) NOT NULL, "
        f"access_token TEXT, refresh_token TEXT, expires_at {expiry}, scopes JSON"
    )


@pytest.fixture(params=["postgresql", "mariadb"])
def accounts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppTable]:
    """An accounts table holding KEY's row, as the application created it before any login."""
    backend: str = request.param
    table = create_table(
        database_url(request, backend, tmp_path),
        backend,
        accounts_columns(backend),
        options=f"{MAPPING}&scopes_column=scopes",
        prefix="accounts",
    )
    try:
        table.insert(id=KEY, plan="team")
        yield table
    finally:
        table.drop()


@contextlib.contextmanager
def opened(url: str) -> Iterator[CredentialStore]:
    """A sync store on ``url``, closed afterwards."""
    store = open_store(url)
    assert isinstance(store, CredentialStore)
    with contextlib.closing(store):
        yield store


def run_tokens(node: str, command: str, table: AppTable, stdin: str = "") -> str:
    """``node tokens.mjs COMMAND URL TABLE id KEY``: the application on KEY's row."""
    # The same database under the URL scheme the Node drivers take, without SQLAlchemy's driver.
    url = make_url(table.server)
    scheme = "postgresql" if table.backend == "postgresql" else "mysql"
    node_url = url.set(drivername=scheme, query={}).render_as_string(hide_password=False)
    return run_node(node, "tokens.mjs", command, node_url, table.name, "id", KEY, stdin=stdin)


def iso(moment: datetime) -> str:
    """``moment`` as JavaScript's ``toISOString()`` spells it."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_node(node: str, script: str, *args: str, stdin: str) -> str:
    """``node docs/examples/app_cipher/SCRIPT ARGS...`` with the application's SECRET_KEY."""
    result = subprocess.run(
        [node, str(APP_CIPHER / script), *args],
        input=stdin,
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

        assert "sk-ant-ort01-example" == run_node(node, "app_cipher.mjs", "decrypt", stdin=sealed)

    def test_the_codec_opens_what_node_encrypted(self, node: str, codec: TokenCodec) -> None:
        """A token the application encrypted opens with the codec."""
        sealed = run_node(node, "app_cipher.mjs", "encrypt", stdin="sk-ant-oat01-example")

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

            read_back = run_node(node, "app_cipher.mjs", "decrypt", stdin=record.refresh_token)

            assert fresh.refresh_token == Secret(read_back)
            assert "current" == fake.refresh_token_state(Secret(read_back))

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
        with opened(url) as store:
            record = store.get("storm-user")
        assert record is not None

        assert (1, ("ok",), (), 32) == (
            report.refreshes,
            report.outcomes,
            report.errors,
            report.holding_current,
        )
        # Every caller holds the access token the application itself reads back from the store.
        stored_access = run_node(node, "app_cipher.mjs", "decrypt", stdin=record.access_token)
        assert {hashlib.sha256(stored_access.encode()).hexdigest()} == set(report.tokens_seen)


@pytest.mark.usefixtures("node_modules")
class TestTheApplicationsRow:
    def test_the_application_reads_the_tokens_credkeeper_refreshed(
        self,
        node: str,
        accounts: AppTable,
        codec: TokenCodec,
        fake: FakeProvider,
        clock: FakeClock,
        tmp_path: Path,
    ) -> None:
        """After a refresh, the app's program decrypts from the row the tokens the manager holds."""
        with (
            opened(accounts.url) as store,
            TokenManager(
                store, fake.provider(), journal=tmp_path / "j", codec=codec, clock=clock
            ) as tokens,
        ):
            tokens.put(KEY, fake.issue(expires_in=0))
            fresh = tokens.refresh(KEY)
            stored = store.get(KEY)
        assert stored is not None

        read = json.loads(run_tokens(node, "read", accounts))

        assert {
            "access_token": fresh.access_token.get_secret_value(),
            "refresh_token": fresh.refresh_token.get_secret_value(),
            "expires_at": iso(stored.expires_at),
            "scopes": list(stored.scopes),
        } == read

    def test_credkeeper_reads_the_tokens_the_application_wrote_at_login(
        self,
        node: str,
        accounts: AppTable,
        codec: TokenCodec,
        fake: FakeProvider,
        clock: FakeClock,
        tmp_path: Path,
    ) -> None:
        """Tokens the app's program encrypted into the row are what the manager's get() returns."""
        login = fake.issue(expires_at=clock.now() + timedelta(hours=8))
        run_tokens(
            node,
            "write",
            accounts,
            stdin=json.dumps(
                {
                    "access_token": login.access_token.get_secret_value(),
                    "refresh_token": login.refresh_token.get_secret_value(),
                    "expires_at": iso(login.expires_at),
                    "scopes": list(login.scopes),
                }
            ),
        )

        with (
            opened(accounts.url) as store,
            TokenManager(
                store, fake.provider(), journal=tmp_path / "j", codec=codec, clock=clock
            ) as tokens,
        ):
            held = tokens.get(KEY)

        assert (login.access_token, login.refresh_token, login.expires_at, login.scopes) == (
            held.access_token,
            held.refresh_token,
            held.expires_at,
            held.scopes,
        )
