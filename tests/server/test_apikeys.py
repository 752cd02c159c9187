"""API key files: what they hold, how keys are checked, and what bad input does to them."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from credkeeper import ConfigurationError
from credkeeper.server import ApiKey, ApiKeys, create_api_key, list_api_keys, revoke_api_key
from credkeeper.server._apikeys import SCOPES


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's API key file goes (not created yet)."""
    return tmp_path / "config" / "api-keys.jsonl"


def lines(path: Path) -> list[dict[str, object]]:
    """The file's lines, each parsed as JSON."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, *documents: object) -> Path:
    """A 0600 API key file holding ``documents``, one JSON value a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(doc) + "\n" for doc in documents), encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def entry(name: object = "web", **fields: object) -> dict[str, object]:
    """A valid line of an API key file, with ``fields`` replaced."""
    document: dict[str, object] = {
        "name": name,
        "hash": "sha256:" + hashlib.sha256(str(name).encode()).hexdigest(),
        "scopes": ["messages"],
        "keys_matching": None,
        "created_at": "2026-01-01T12:00:00Z",
    }
    document.update(fields)
    return document


class TestFile:
    def test_a_line_holds_name_hash_scopes_glob_and_time(self, path: Path) -> None:
        """create writes one JSON line: name, sha256 of the key, sorted scopes, glob, time."""
        key = create_api_key(path, "web", ["messages", "credentials:read"], keys_matching="acme:*")

        [line] = lines(path)
        created = datetime.fromisoformat(str(line.pop("created_at")))
        assert {
            "name": "web",
            "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(),
            "scopes": ["credentials:read", "messages"],
            "keys_matching": "acme:*",
        } == line
        assert UTC.utcoffset(None) == created.utcoffset()

    def test_the_file_never_holds_the_key(self, path: Path) -> None:
        """Only the key's digest is written, never the key or its random part."""
        key = create_api_key(path, "web", ["admin"])

        text = path.read_text(encoding="utf-8")
        assert (False, False) == (key in text, key.removeprefix("ck_") in text)

    def test_the_file_and_its_directory_are_private(self, path: Path) -> None:
        """A new file gets mode 0600 and a new directory 0700, whatever the umask."""
        old = os.umask(0)
        try:
            create_api_key(path, "web", ["admin"])
        finally:
            os.umask(old)

        modes = (stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(path.parent.stat().st_mode))
        assert (0o600, 0o700) == modes

    def test_create_appends(self, path: Path) -> None:
        """A second key is added after the first, which is kept as it was."""
        create_api_key(path, "web", ["messages"])
        first = path.read_text(encoding="utf-8")

        create_api_key(path, "ops", ["admin"])

        text = path.read_text(encoding="utf-8")
        assert (True, ["web", "ops"]) == (text.startswith(first), [k["name"] for k in lines(path)])

    def test_keys_are_prefixed_and_long(self, path: Path) -> None:
        """A key is ck_ and 43 URL-safe characters: 256 random bits."""
        key = create_api_key(path, "web", ["admin"])

        assert ("ck_", 46) == (key[:3], len(key))

    def test_each_key_is_new(self, path: Path) -> None:
        """Two keys made one after the other differ."""
        assert create_api_key(path, "a", ["admin"]) != create_api_key(path, "b", ["admin"])

    def test_list_gives_every_key_in_order(self, path: Path) -> None:
        """list_api_keys returns each key's name, scopes and glob, in the file's order."""
        create_api_key(path, "web", ["messages"], keys_matching="acme:*")
        create_api_key(path, "ops", ["admin", "metrics"])

        assert [
            ApiKey("web", frozenset({"messages"}), "acme:*"),
            ApiKey("ops", frozenset({"admin", "metrics"})),
        ] == list_api_keys(path)

    def test_list_keeps_the_creation_time(self, path: Path) -> None:
        """The creation time read back is the one written, as an aware UTC time."""
        create_api_key(path, "web", ["messages"])

        [key] = list_api_keys(path)
        assert str(lines(path)[0]["created_at"]).replace("Z", "+00:00") == str(
            key.created_at and key.created_at.isoformat()
        )

    def test_revoke_removes_only_that_key(self, path: Path) -> None:
        """revoke drops the named key's line and keeps the others as they were."""
        create_api_key(path, "web", ["messages"])
        create_api_key(path, "ops", ["admin"])
        ops = lines(path)[1]

        assert (True, [ops]) == (revoke_api_key(path, "web"), lines(path))

    def test_revoke_of_an_unknown_name_is_false(self, path: Path) -> None:
        """revoke returns False and leaves the file alone when no key has that name."""
        create_api_key(path, "web", ["messages"])
        before = path.read_bytes()

        assert (False, before) == (revoke_api_key(path, "nope"), path.read_bytes())

    def test_revoked_key_no_longer_verifies(self, path: Path) -> None:
        """A key revoked from the file is unknown to the keys loaded afterwards."""
        key = create_api_key(path, "web", ["messages"])
        revoke_api_key(path, "web")

        assert None is ApiKeys.load(path).verify(key)

    def test_rewrite_leaves_no_temp_file(self, path: Path) -> None:
        """After create and revoke, the directory holds the file and its lock file only."""
        create_api_key(path, "web", ["messages"])
        revoke_api_key(path, "web")

        assert [path.name, f"{path.name}.lock"] == sorted(p.name for p in path.parent.iterdir())

    def test_blank_lines_are_skipped(self, path: Path) -> None:
        """Empty lines, as an editor may leave, are not keys and not errors."""
        write_lines(path, entry("web"))
        path.write_text("\n" + path.read_text(encoding="utf-8") + "\n\n", encoding="utf-8")

        assert ["web"] == [key.name for key in list_api_keys(path)]


class TestVerify:
    def test_a_created_key_verifies_as_its_entry(self, path: Path) -> None:
        """verify returns the ApiKey the presented key was created as."""
        create_api_key(path, "ops", ["admin"])
        key = create_api_key(path, "web", ["messages"], keys_matching="acme:*")

        assert ApiKey("web", frozenset({"messages"}), "acme:*") == ApiKeys.load(path).verify(key)

    @pytest.mark.parametrize("presented", ["", "ck_", "ck_not-a-key", "sha256:" + "0" * 64])
    def test_other_strings_do_not_verify(self, path: Path, presented: str) -> None:
        """Anything but a created key, its digest included, verifies as None."""
        create_api_key(path, "web", ["messages"])

        assert None is ApiKeys.load(path).verify(presented)

    def test_the_digest_itself_does_not_verify(self, path: Path) -> None:
        """The hash in the file is no key: presenting it is refused."""
        create_api_key(path, "web", ["messages"])

        assert None is ApiKeys.load(path).verify(str(lines(path)[0]["hash"]))

    def test_a_key_with_a_changed_character_does_not_verify(self, path: Path) -> None:
        """One character off is a different key."""
        key = create_api_key(path, "web", ["messages"])
        changed = key[:-1] + ("A" if key[-1] != "A" else "B")

        assert None is ApiKeys.load(path).verify(changed)

    def test_lone_surrogates_do_not_verify(self, path: Path) -> None:
        """A string that is not encodable as UTF-8 is refused, not an error."""
        create_api_key(path, "web", ["messages"])

        assert None is ApiKeys.load(path).verify("ck_\udc80")

    @pytest.mark.parametrize("position", [0, 2, None])
    def test_every_stored_digest_is_compared(
        self, path: Path, monkeypatch: pytest.MonkeyPatch, position: int | None
    ) -> None:
        """verify compares against all keys whichever matches (first, last, none): no early exit.

        A spy counts hmac.compare_digest calls: the count, not a timing, shows the constant path.
        """
        keys = [create_api_key(path, name, ["messages"]) for name in ("a", "b", "c")]
        loaded = ApiKeys.load(path)
        calls = []
        real = hmac.compare_digest

        def counting(a: bytes, b: bytes) -> bool:
            calls.append(1)
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", counting)
        loaded.verify("ck_wrong" if position is None else keys[position])

        assert 3 == len(calls)

    def test_len_counts_the_keys(self, path: Path) -> None:
        """len() of the loaded keys is the number of lines in the file."""
        for name in ("a", "b", "c"):
            create_api_key(path, name, ["messages"])

        assert 3 == len(ApiKeys.load(path))

    def test_repr_names_keys_without_digests(self, path: Path) -> None:
        """repr shows the key names and no digest."""
        create_api_key(path, "web", ["messages"])

        assert "ApiKeys([web])" == repr(ApiKeys.load(path))

    def test_an_empty_file_holds_no_keys(self, path: Path) -> None:
        """An empty file loads as no keys, which verify nothing."""
        write_lines(path)

        assert 0 == len(ApiKeys.load(path))


class TestScopesAndGlobs:
    @pytest.mark.parametrize("scope", sorted(SCOPES))
    def test_allows_the_scopes_it_holds(self, scope: str) -> None:
        """allows is true for each scope the key holds."""
        assert ApiKey("k", frozenset({scope})).allows(scope)

    def test_allows_no_other_scope(self) -> None:
        """allows is false for a scope the key lacks; admin does not imply the others."""
        key = ApiKey("k", frozenset({"admin"}))

        assert [False] * 4 == [key.allows(scope) for scope in sorted(SCOPES - {"admin"})]

    def test_without_glob_every_key_is_covered(self) -> None:
        """A key with no glob reaches every credential key."""
        key = ApiKey("k", frozenset({"messages"}))

        assert (True, True) == (key.covers("acme:alice"), key.covers("other/bob"))

    @pytest.mark.parametrize(
        ("credential_key", "expected"),
        [("acme:alice", True), ("acme:", True), ("ACME:alice", False), ("globex:acme:x", False)],
    )
    def test_a_glob_limits_the_keys(self, credential_key: str, expected: bool) -> None:
        """A glob covers the credential keys it matches, case-sensitively, whole."""
        key = ApiKey("k", frozenset({"messages"}), "acme:*")

        assert expected == key.covers(credential_key)

    def test_scopes_given_as_a_list_become_a_frozenset(self) -> None:
        """Scopes given as any iterable are kept as a frozenset, so the key stays hashable."""
        key = ApiKey("k", ["admin", "metrics"])  # type: ignore[arg-type]

        assert frozenset({"admin", "metrics"}) == key.scopes

    def test_duplicate_scopes_are_kept_once(self, path: Path) -> None:
        """A scope given twice is written once."""
        create_api_key(path, "web", ["messages", "messages"])

        assert ["messages"] == lines(path)[0]["scopes"]


class TestBadInput:
    def test_unknown_scope(self, path: Path) -> None:
        """An unknown scope is refused, naming it and the valid ones; no file is made."""
        with pytest.raises(ConfigurationError) as caught:
            create_api_key(path, "web", ["messages", "write"])

        assert (
            "API key scopes holds unknown scope 'write'; give any of admin, credentials:read, "
            "credentials:write, messages, metrics"
        ) == str(caught.value)
        assert not path.exists()

    def test_empty_scopes(self, path: Path) -> None:
        """No scope at all is refused: such a key could call nothing."""
        with pytest.raises(ConfigurationError, match="scopes is empty"):
            create_api_key(path, "web", [])

    def test_scopes_as_a_string(self, path: Path) -> None:
        """One string is not taken as a list of its characters."""
        with pytest.raises(ConfigurationError, match="must be a list of scope names"):
            create_api_key(path, "web", "admin")

    @pytest.mark.parametrize("name", ["", "has space", "-leading", "x" * 65, 'quo"te'])
    def test_bad_name(self, path: Path, name: str) -> None:
        """A name that is empty, too long, or holds spaces or quotes is refused."""
        with pytest.raises(ConfigurationError, match=r"API key name .* is not usable"):
            create_api_key(path, name, ["admin"])

    def test_empty_glob(self, path: Path) -> None:
        """An empty glob is refused rather than taken to mean every key or none."""
        with pytest.raises(ConfigurationError, match="keys_matching '' is not a glob"):
            create_api_key(path, "web", ["admin"], keys_matching="")

    def test_duplicate_name_keeps_the_file(self, path: Path) -> None:
        """A name already in the file is refused, and the file is unchanged."""
        create_api_key(path, "web", ["messages"])
        before = path.read_bytes()

        with pytest.raises(ConfigurationError, match="already holds a key named 'web'"):
            create_api_key(path, "web", ["admin"])
        assert before == path.read_bytes()

    def test_missing_file_on_load(self, path: Path) -> None:
        """Loading a missing file names it and how to make one."""
        with pytest.raises(ConfigurationError) as caught:
            ApiKeys.load(path)

        assert (
            f"API key file {path} does not exist; create a key in it with "
            f"`credkeeper apikey create NAME --scope SCOPE --file {path}`"
        ) == str(caught.value)

    def test_revoke_in_a_missing_file(self, path: Path) -> None:
        """revoke on a missing file says the file is missing, and creates nothing."""
        with pytest.raises(ConfigurationError, match="does not exist"):
            revoke_api_key(path, "web")
        assert not path.exists()

    def test_a_file_others_may_write_is_refused(self, path: Path) -> None:
        """A group- or world-writable file is refused, naming the fix."""
        write_lines(path, entry())
        os.chmod(path, 0o620)

        with pytest.raises(ConfigurationError) as caught:
            ApiKeys.load(path)

        assert (
            f"API key file {path} has mode 0620: others may write it and grant themselves any "
            f"scope; run chmod 600 {path}"
        ) == str(caught.value)

    def test_a_symbolic_link_is_refused(self, path: Path, tmp_path: Path) -> None:
        """A symbolic link where the file should be is refused, not followed."""
        target = write_lines(tmp_path / "elsewhere.jsonl", entry())
        path.parent.mkdir()
        path.symlink_to(target)

        with pytest.raises(ConfigurationError, match="is a symbolic link"):
            ApiKeys.load(path)

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ("not json", "not a JSON object"),
            ([1, 2], "not a JSON object"),
            ({k: v for k, v in entry().items() if k != "hash"}, "the field 'hash' is missing"),
            ({k: v for k, v in entry().items() if k != "scopes"}, "the field 'scopes' is missing"),
            (entry(hash="md5:abc"), "the field 'hash' must be 'sha256:' and 64"),
            (entry(scopes="admin"), "the field 'scopes' must be a list"),
            (entry(scopes=["root"]), "the field 'scopes' holds unknown scope 'root'"),
            (entry(scopes=[]), "the field 'scopes' is empty"),
            (entry(scopes=[{}]), "the field 'scopes' holds unknown scope {}"),
            (entry(name=7), "the field 'name' 7 is not usable"),
            (entry(keys_matching=3), "the field 'keys_matching' 3 is not a glob"),
            (entry(created_at="yesterday"), "the field 'created_at' must be an ISO 8601 time"),
            (entry(created_at="2026-01-01T12:00:00"), "the field 'created_at' must be an ISO"),
            (entry(expires_at=None), "unknown field(s) 'expires_at'"),
        ],
    )
    def test_a_bad_line_names_the_file_line_and_field(
        self, path: Path, document: object, message: str
    ) -> None:
        """Each kind of bad line is refused with the file, the line number and the field."""
        write_lines(path, entry("ok"))
        with path.open("a", encoding="utf-8") as handle:
            handle.write((document if isinstance(document, str) else json.dumps(document)) + "\n")

        with pytest.raises(ConfigurationError) as caught:
            ApiKeys.load(path)

        assert str(caught.value).startswith(f"API key file {path}, line 2: {message}")

    def test_a_name_twice_in_the_file_is_refused(self, path: Path) -> None:
        """Two lines with one name make the file unusable: which key is 'web' in an audit?"""
        write_lines(path, entry("web"), entry("web", hash="sha256:" + "0" * 64))

        with pytest.raises(ConfigurationError, match="line 2: the name 'web' is already used"):
            ApiKeys.load(path)

    def test_create_on_a_damaged_file_keeps_it(self, path: Path) -> None:
        """create refuses to rewrite a file it cannot read, so no stored key is lost."""
        write_lines(path, entry("web"))
        with path.open("a", encoding="utf-8") as handle:
            handle.write("{broken\n")
        before = path.read_bytes()

        with pytest.raises(ConfigurationError, match="line 2: not a JSON object"):
            create_api_key(path, "ops", ["admin"])
        assert before == path.read_bytes()

    def test_a_naive_creation_time_is_refused(self) -> None:
        """An ApiKey's created_at must carry its offset."""
        with pytest.raises(ConfigurationError, match="aware datetime"):
            ApiKey("k", frozenset({"admin"}), created_at=datetime(2026, 1, 1))


class TestConcurrency:
    def test_concurrent_creates_from_threads_lose_nothing(self, path: Path) -> None:
        """32 threads creating keys at once: every key is in the file and verifies as itself."""
        names = [f"key-{n}" for n in range(32)]
        created: dict[str, str] = {}
        barrier = threading.Barrier(len(names))

        def make(name: str) -> None:
            barrier.wait()
            created[name] = create_api_key(path, name, ["messages"])

        threads = [threading.Thread(target=make, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        loaded = ApiKeys.load(path)
        verified = {
            name: getattr(loaded.verify(key), "name", None) for name, key in created.items()
        }
        assert ({name: name for name in names}, 32) == (verified, len(loaded))

    def test_concurrent_creates_from_processes_lose_nothing(self, path: Path) -> None:
        """4 processes creating 8 keys each at once: all 32 are in the file and verify."""
        script = (
            "import sys\n"
            "from credkeeper.server import create_api_key\n"
            "path, prefix = sys.argv[1], sys.argv[2]\n"
            "for n in range(8):\n"
            "    key = create_api_key(path, f'{prefix}-{n}', ['messages'])\n"
            "    print(f'{prefix}-{n} {key}')\n"
        )
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path), f"p{p}"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for p in range(4)
        ]
        printed = [worker.communicate(timeout=120)[0] for worker in workers]

        loaded = ApiKeys.load(path)
        pairs = [line.split() for output in printed for line in output.splitlines()]
        verified = {name: getattr(loaded.verify(key), "name", None) for name, key in pairs}
        assert ({name: name for name, _ in pairs}, 32, 32) == (verified, len(pairs), len(loaded))

    def test_concurrent_creates_of_one_name_make_one_key(self, path: Path) -> None:
        """Threads racing to create the same name: one wins, the others are refused."""
        outcomes: list[str] = []
        barrier = threading.Barrier(8)

        def make() -> None:
            barrier.wait()
            try:
                create_api_key(path, "web", ["messages"])
                outcomes.append("created")
            except ConfigurationError:
                outcomes.append("refused")

        threads = [threading.Thread(target=make) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert (["created"] + ["refused"] * 7, 1) == (sorted(outcomes), len(lines(path)))


def test_the_api_key_names_import_without_fastapi(tmp_path: Path) -> None:
    """credkeeper.server's API key names work with FastAPI blocked: the command line uses them."""
    script = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from credkeeper.server import ApiKeys, create_api_key\n"
        "path = sys.argv[1]\n"
        "key = create_api_key(path, 'web', ['admin'])\n"
        "print(ApiKeys.load(path).verify(key).name)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "keys.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert (0, "web\n", "") == (completed.returncode, completed.stdout, completed.stderr)
