"""What the documentation's blocks run against: a sandbox, and the hidden setups pages name.

A page names a setup with ``<!-- setup: NAME -->`` above a block (see ``test_examples.py``); the
fixture ``setup_NAME`` (dashes as underscores) below makes it. A :class:`Setup` gives the block
names the page leaves to the application (``client``, ``credentials``, ``manager``) and stand-ins:
a deployment's address the block shows (``db.internal``, ``/etc/credkeeper/api-keys``, port 9464),
replaced by a local one in the code that runs. The reader's code is otherwise run as shown.

Remote services are played by local ones: the public wrapper and Claude's token endpoint by
:class:`FakeWrapper` and :class:`FakeProvider` behind :class:`ClaudeHosts`, a TLS proxy that
``https_proxy`` and ``SSL_CERT_FILE`` send httpx to; a MongoDB cluster's DNS SRV record by
:class:`SrvRecords`; MongoDB by SecantusDB and SQL by the local PostgreSQL, each in a database of
the test's own. A setup needing a server that cannot be reached fails on CI and skips elsewhere,
naming how to start it (``tests/backends.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
import select
import socket
import socketserver
import ssl
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pymongo import MongoClient

import credkeeper.__main__
from credkeeper import (
    AsyncTokenManager,
    AsyncWrapperClient,
    KeyRing,
    MemoryStore,
    TokenManager,
    WrapperClient,
)
from credkeeper.testing import FakeProvider, FakeWrapper

# mongodb_url is the store tests' session fixture (found, or SecantusDB started): imported so
# that it is one here too, since only the top-level conftest may name pytest_plugins.
from tests.adapters.mongo.conftest import free_port, mongodb_url, with_database
from tests.examples import APP_CIPHER, SECRET_KEY
from tests.markdown import DOCS, stand_in

__all__ = ["Setup", "close_opened", "mongodb_url"]

# A key ring that is no one's: 32 zero bytes, base64url, under the id "docs".
KEYS = "docs:" + base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")
WRAPPER_HOST = "wrapper.claude.serenity-system.fr"
TOKEN_HOST = "platform.claude.com"
HISTORY = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class Setup:
    """What a hidden setup gives one block: names in its namespace, and stand-ins in its code."""

    names: Mapping[str, object] = field(default_factory=dict)
    #: text the block shows -> the local stand-in that runs in its place
    stand_ins: Mapping[str, str] = field(default_factory=dict)

    def apply(self, source: str, where: str) -> str:
        """``source`` with every stand-in in place; each must appear, or the page has moved on."""
        return stand_in(source, self.stand_ins, where, "its setup in tests/docs/conftest.py")


def close_opened(namespace: Mapping[str, object]) -> None:
    """Close the managers and wrapper clients a page's blocks left open, as their program's
    exit would: an open SQL connection pool left to the garbage collector warns, and warnings
    are errors. A manager closes its store; closing twice is harmless."""
    for value in list(namespace.values()):
        if isinstance(value, AsyncTokenManager | AsyncWrapperClient):
            asyncio.run(value.aclose())
        elif isinstance(value, TokenManager | WrapperClient):
            value.close()


def cli(*args: str) -> None:
    """Run ``credkeeper ARGS`` in-process, as a page's console block does; its output is dropped."""
    with contextlib.redirect_stdout(io.StringIO()):
        code = credkeeper.__main__.main(list(args))
    assert 0 == code, f"credkeeper {' '.join(args)} exited {code}"


# -- the sandbox every block runs in -------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory and the CREDKEEPER_* settings the examples assume."""
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.startswith("CREDKEEPER_")]:
        if not name.startswith("CREDKEEPER_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CREDKEEPER_KEYS", KEYS)
    monkeypatch.setenv("CREDKEEPER_STORE", f"file://{tmp_path}/credentials.db")
    monkeypatch.setenv("CREDKEEPER_JOURNAL", str(tmp_path / "journal"))
    return tmp_path


# -- Claude's public hosts, played by the fakes --------------------------------------------


@pytest.fixture
def docs_provider() -> Iterator[FakeProvider]:
    """A token endpoint on the system clock, as the pages' managers read it."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def docs_wrapper(docs_provider: FakeProvider) -> Iterator[FakeWrapper]:
    """The wrapper, accepting the tokens ``docs_provider`` issues."""
    with FakeWrapper(docs_provider) as wrapper:
        yield wrapper


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    """A certificate for ``key``'s public half, valid from an hour ago for two days."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def _certificate_authority(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A throwaway CA's certificate, and a server certificate for ``hosts`` signed by it."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "credkeeper docs test CA")])
    signing = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca: x509.Certificate = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(signing, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server: x509.Certificate = (
        _builder(name, ca_name, key)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, server_file = directory / "ca.pem", directory / "server.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_file.write_bytes(
        server.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, server_file


class _Tunnel(socketserver.BaseRequestHandler):
    """One ``CONNECT host:443``: TLS ends here, and the plain bytes go to the host's fake."""

    server: ClaudeHosts

    def handle(self) -> None:
        connection: socket.socket = self.request
        request = connection.makefile("rb")
        method, target, _ = request.readline().decode("latin-1").split(" ", 2)
        while request.readline() not in (b"\r\n", b"\n", b""):
            pass
        upstream = self.server.routes.get(target.rpartition(":")[0])
        if method != "CONNECT" or upstream is None:
            # Any other host is refused: nothing a block does leaves the machine.
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with (
            self.server.tls.wrap_socket(connection, server_side=True) as tls,
            socket.create_connection(upstream) as plain,
        ):
            _relay(tls, plain)


def _relay(tls: ssl.SSLSocket, plain: socket.socket) -> None:
    """Copy bytes both ways until either side closes; one thread, as an SSL socket needs."""
    other = {tls: plain, plain: tls}
    while True:
        # Bytes OpenSSL already decrypted do not make the socket readable again.
        ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 60)[0]
        if not ready:
            return
        for side in ready:
            data = side.recv(65536)
            if not data:
                return
            other[side].sendall(data)


class ClaudeHosts(socketserver.ThreadingTCPServer):
    """An HTTPS proxy on loopback that is the public wrapper and Claude's token endpoint.

    httpx reaches ``https://`` URLs through ``https_proxy`` and trusts ``SSL_CERT_FILE``, so a
    block calling the public wrapper with ``WrapperClient(tokens)``, or refreshing with
    ``Provider.claude_code()``, talks to the fakes with its code unchanged. Other hosts get 403.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, routes: Mapping[str, str], server_certificate: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.routes = {
            host: (url.removeprefix("http://").partition(":")[0], int(url.rpartition(":")[2]))
            for host, url in routes.items()
        }
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(server_certificate)

    @property
    def url(self) -> str:
        """The proxy's URL, for ``https_proxy``."""
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="session")
def claude_certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The CA file httpx is told to trust, and the certificate the proxy presents."""
    return _certificate_authority(tmp_path_factory.mktemp("ca"), [WRAPPER_HOST, TOKEN_HOST])


@pytest.fixture
def claude_hosts(
    claude_certificates: tuple[Path, Path],
    docs_provider: FakeProvider,
    docs_wrapper: FakeWrapper,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[ClaudeHosts]:
    """The public wrapper and Claude Code's token endpoint, as the fakes, for this test."""
    ca_file, server_file = claude_certificates
    proxy = ClaudeHosts(
        {WRAPPER_HOST: docs_wrapper.url, TOKEN_HOST: docs_provider.url}, server_file
    )
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setenv("https_proxy", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


@pytest.fixture
def claude_code_home(
    sandbox: Path, docs_provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A HOME whose ``~/.claude/.credentials.json`` holds a login the fake provider issued."""
    home = sandbox / "home"
    (home / ".claude").mkdir(parents=True)
    login = home / ".claude" / ".credentials.json"
    login.write_text(json.dumps(docs_provider.issue().to_claude_code()), encoding="utf-8")
    login.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def setup_claude_code_login(
    claude_code_home: Path, claude_hosts: ClaudeHosts, monkeypatch: pytest.MonkeyPatch
) -> Setup:
    """quickstart.md's steps 1 and 2: the key ring (the sandbox's ``CREDKEEPER_KEYS``), and
    ``credkeeper import --key alice`` of Claude Code's login into the default file store; the
    block then calls the public wrapper, played by the fakes."""
    monkeypatch.delenv("CREDKEEPER_STORE")
    cli("import", "--key", "alice")
    return Setup()


@pytest.fixture
def setup_claude_code_home(
    sandbox: Path, claude_code_home: Path, claude_hosts: ClaudeHosts
) -> Setup:
    """The README's example: Claude Code's login in ``HOME`` for the block to store itself,
    the public wrapper played by the fakes, the application's file store in the sandbox
    instead of /var/lib/myapp."""
    directory = sandbox / "myapp"
    directory.mkdir()
    url = (directory / "credentials.json").as_uri()
    return Setup(stand_ins={"file:///var/lib/myapp/credentials.json": url})


@pytest.fixture
def setup_myapp_login(sandbox: Path, claude_code_home: Path, claude_hosts: ClaudeHosts) -> Setup:
    """wrapper.md's first call: alice's login in the application's file store, kept here in
    the sandbox instead of /var/lib/myapp."""
    directory = sandbox / "myapp"
    directory.mkdir()
    url = (directory / "credentials.json").as_uri()
    cli("--store", url, "import", "--key", "alice")
    return Setup(stand_ins={"file:///var/lib/myapp/credentials.json": url})


@pytest.fixture
def setup_wrapper_client(
    sandbox: Path, docs_provider: FakeProvider, docs_wrapper: FakeWrapper
) -> Iterator[Setup]:
    """The application's ``client``, open on the fake wrapper with alice logged in, and a
    ``history``: what a fragment inside the first example's ``with`` block has."""
    with (
        TokenManager(MemoryStore(), docs_provider.provider(), journal=sandbox / "j") as tokens,
        WrapperClient(tokens, base_url=docs_wrapper.url) as client,
    ):
        tokens.put("alice", docs_provider.issue())
        yield Setup(names={"client": client, "history": HISTORY})


@pytest.fixture
def setup_async_wrapper_client(
    sandbox: Path, docs_provider: FakeProvider, claude_hosts: ClaudeHosts
) -> Iterator[Setup]:
    """The application's ``async_tokens`` (an AsyncTokenManager with alice logged in) and a
    ``history``; the page's client calls the public wrapper, played by the fakes."""
    store = MemoryStore()
    with TokenManager(store, docs_provider.provider(), journal=sandbox / "j") as tokens:
        tokens.put("alice", docs_provider.issue())
        async_tokens = AsyncTokenManager(store, docs_provider.provider(), journal=sandbox / "j")
        try:
            yield Setup(names={"async_tokens": async_tokens, "history": HISTORY})
        finally:
            asyncio.run(async_tokens.aclose())


# -- the service and the metrics ------------------------------------------------------------


@pytest.fixture
def setup_service(sandbox: Path, docs_provider: FakeProvider) -> Iterator[Setup]:
    """service.md's ``manager`` and ``webhook_secret``, and the API key file its console block
    creates, written in the sandbox instead of /etc/credkeeper."""
    api_keys = sandbox / "api-keys"
    cli(
        *("apikey", "create", "billing-app", "--scope", "credentials:read", "--scope", "messages"),
        *("--keys-matching", "billing/*", "--file", str(api_keys)),
    )
    manager = AsyncTokenManager(MemoryStore(), docs_provider.provider(), journal=sandbox / "j")
    # As the page makes one: echo "whsec_$(openssl rand -base64 32)".
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    try:
        yield Setup(
            names={"manager": manager, "webhook_secret": secret},
            stand_ins={"/etc/credkeeper/api-keys": str(api_keys)},
        )
    finally:
        asyncio.run(manager.aclose())


@pytest.fixture
def setup_metrics(sandbox: Path, docs_provider: FakeProvider) -> Setup:
    """engine.md's ``store``, ``provider`` and ``keyring``, and a free port for 9464.

    The block keeps no handle on the metrics server it starts, so that server (a daemon
    thread) answers on the free port until the test session ends.
    """
    return Setup(
        names={
            "store": MemoryStore(),
            "provider": docs_provider.provider(),
            "keyring": KeyRing.from_env(),
        },
        stand_ins={"start_http_server(9464,": f"start_http_server({free_port()},"},
    )


# -- MongoDB -------------------------------------------------------------------------------


class _Answer(socketserver.BaseRequestHandler):
    """One DNS query: the records asked for, or NXDOMAIN."""

    server: SrvRecords

    def handle(self) -> None:
        data, connection = self.request
        query = dns.message.from_wire(data)
        answer = dns.message.make_response(query)
        question = query.question[0]
        kind = dns.rdatatype.to_text(question.rdtype)
        found = self.server.records.get((question.name.to_text(), kind))
        if found is None:
            answer.set_rcode(dns.rcode.NXDOMAIN)
        else:
            answer.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", kind, found))
        connection.sendto(answer.to_wire(), self.client_address)


class SrvRecords(socketserver.UDPServer):
    """A DNS server on loopback answering the SRV records of a ``mongodb+srv://`` cluster.

    pymongo resolves them through dnspython's default resolver, which the setup points at
    :meth:`resolver`; every other name is NXDOMAIN (no TXT record: no options from DNS).
    """

    def __init__(self, records: Mapping[tuple[str, str], list[str]]) -> None:
        super().__init__(("127.0.0.1", 0), _Answer)
        self.records = dict(records)

    def resolver(self) -> dns.resolver.Resolver:
        """A resolver asking this server only."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.server_address[1]
        return resolver


@pytest.fixture
def setup_mongodb_srv(monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    """The DNS SRV record of mongodb.md's ``cluster0.example.net``, served on loopback."""
    server = SrvRecords(
        {("_mongodb._tcp.cluster0.example.net.", "SRV"): ["0 0 27017 db0.cluster0.example.net."]}
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(dns.resolver, "default_resolver", server.resolver())
    try:
        yield Setup()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def mongodb_test_url(mongodb_url: str) -> Iterator[str]:
    """A URL naming a database of this test's own on the MongoDB server, dropped at the end."""
    database = f"ck_docs_{uuid.uuid4().hex[:8]}"
    yield with_database(mongodb_url, database)
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_url)
    with contextlib.closing(client):
        client.drop_database(database)


@pytest.fixture
def setup_mongodb_client(mongodb_test_url: str) -> Iterator[Setup]:
    """The application's pymongo ``client``, on the local server."""
    client: MongoClient[dict[str, Any]] = MongoClient(mongodb_test_url)
    with contextlib.closing(client):
        yield Setup(names={"client": client})


@pytest.fixture
def setup_mongodb(mongodb_test_url: str, docs_provider: FakeProvider) -> Setup:
    """A login as ``credentials``, and the local server in place of db.internal."""
    return Setup(
        names={"credentials": docs_provider.issue()},
        stand_ins={"mongodb://db.internal/app": mongodb_test_url},
    )


# -- SQL -----------------------------------------------------------------------------------


@pytest.fixture
def setup_sql_app() -> Setup:
    """The application an alembic env.py imports: ``app.metadata``, its tables' MetaData."""
    return Setup(names={"app": SimpleNamespace(metadata=sa.MetaData())})


def _page_sql(page: str, starting: str) -> str:
    """The ```sql block of ``page`` whose text starts with ``starting``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    for chunk in text.split("```sql\n")[1:]:
        body = chunk.partition("\n```")[0]
        if body.startswith(starting):
            return body
    raise AssertionError(f"{page} has no ```sql block starting {starting!r}")


@pytest.fixture
def postgres_test_url(postgres_url: str) -> Iterator[str]:
    """A URL naming a database of this test's own on the PostgreSQL server, dropped at the end."""
    database = f"ck_docs_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{database}"'))
        yield sa.make_url(postgres_url).set(database=database).render_as_string(False)
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{database}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def setup_postgresql(postgres_test_url: str, docs_provider: FakeProvider) -> Setup:
    """sql.md's ``claude_tokens`` table, made by the page's own CREATE TABLE and its
    ``init-store``, a login as ``credentials``, and the local server in place of db.internal."""
    engine = sa.create_engine(postgres_test_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(_page_sql("stores/sql.md", "CREATE TABLE claude_tokens")))
    finally:
        engine.dispose()
    cli(
        "init-store",
        f"{postgres_test_url}?table=claude_tokens&insert=true&key_column=user_id"
        "&access_token_column=access_token&refresh_token_column=refresh_token"
        "&expires_at_column=expires_at&scopes_column=scopes"
        "&subscription_type_column=subscription_type",
    )
    return Setup(
        names={"credentials": docs_provider.issue()},
        stand_ins={"postgresql+psycopg://app@db.internal/app": postgres_test_url},
    )


@pytest.fixture
def setup_app_cipher(monkeypatch: pytest.MonkeyPatch) -> Setup:
    """docs/examples/app_cipher importable, and the application's SECRET_KEY set."""
    monkeypatch.syspath_prepend(str(APP_CIPHER))
    monkeypatch.setenv("SECRET_KEY", SECRET_KEY)
    return Setup()
