"""The Node.js and PHP code the docs show, run as shown against a real ``credkeeper serve``.

``test_clients.py`` runs the example programs; this runs what the pages tell a reader to write
or type: each ```js and ```php block of ``docs/service.md`` and the two examples' READMEs, and
each command line of the READMEs' console blocks that runs the example program. A block runs with
the real ``node`` or ``php``, in a temporary directory holding a copy of the client file it
imports, against the test's service and FakeWrapper. Only the deployment's values change: the
service's URL ``http://127.0.0.1:8080``, the wrapper's ``https://wrapper.example`` and the API
key placeholder ``ck_...`` are replaced by the test's, and a page that stops showing one of them
fails (the test would otherwise run something other than what the page shows). A code block gets
the API key through ``CREDKEEPER_API_KEY``, the variable it reads itself.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from credkeeper import Credentials
from credkeeper.testing import FakeProvider, FakeWrapper
from tests.backends import require_service
from tests.markdown import DOCS, Fenced, check_shown, fenced, stand_in, swapped

from .conftest import Service
from .test_clients import CLIENTS, REPLY, Outcome

# The pages whose code and console blocks use the clients of docs/examples/{node,php}.
SNIPPET_PAGES = ("service.md", "examples/node/README.md", "examples/php/README.md")
README_PAGES = ("examples/node/README.md", "examples/php/README.md")
# A fence's info string names the language; these are the ones a client runs.
LANGUAGES = {"js": "node", "mjs": "node", "javascript": "node", "php": "php"}
# Each language's file name for a block: an ES module (the blocks use top-level await), a script.
SCRIPT_NAMES = {"node": "app.mjs", "php": "app.php"}
# The deployment's values the pages show, which a test replaces by its own.
SERVICE_URL = "http://127.0.0.1:8080"
WRAPPER_URL = "https://wrapper.example"
API_KEY_PLACEHOLDER = "ck_..."
# The user key the code blocks call the wrapper for.
USER_KEY = "billing/alice"
# Who replaces a page's deployment values, for the failure of a page that stops showing one.
OWNER = "tests/server/test_client_snippets.py"
# How the client programs print a failure on stderr (the READMEs: "code: detail").
PROBLEM_LINE = re.compile(r"^[a-z][a-z0-9_]*: ")


def page_blocks(page: str) -> Iterator[Fenced]:
    """The fenced blocks of ``docs/<page>``, in page order."""
    return fenced((DOCS / page).read_text(encoding="utf-8").splitlines())


def executable(language: str) -> str:
    """The path of ``node`` or ``php``: a failure on CI when it is missing, a skip elsewhere."""
    name, _, title, how_to_install = CLIENTS[language]
    found = shutil.which(name)
    if found is None:
        require_service(title, [f"{name} on PATH"], how_to_install)
    return found


def workspace(directory: Path) -> Path:
    """``directory`` holding a copy of both client files, as the pages' blocks expect them."""
    directory.mkdir(exist_ok=True)
    for _, program, _, _ in CLIENTS.values():
        shutil.copy(program, directory / program.name)
    return directory


def run(command: list[str], cwd: Path, env: dict[str, str]) -> Outcome:
    """Run ``command`` in ``cwd`` with only ``env`` (and ``PATH``) in its environment."""
    result = subprocess.run(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), **env},
        timeout=60,
        check=False,
    )
    return Outcome(result.returncode, result.stdout, result.stderr)


# -- the ```js and ```php blocks ------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """A code block of a page and the client that runs it."""

    page: str
    block: Fenced
    client: str  # "node" or "php"

    @property
    def id(self) -> str:
        """``page:line``, the test id that points at the block."""
        return f"{self.page}:{self.block.line}"


SNIPPETS = [
    Snippet(page, block, LANGUAGES[block.language])
    for page in SNIPPET_PAGES
    for block in page_blocks(page)
    if block.language in LANGUAGES
]

RunSnippet = Callable[[], Outcome]


@pytest.fixture(params=SNIPPETS, ids=lambda snippet: snippet.id)
def run_snippet(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: Callable[..., Service],
    api_keys_file: Path,
    new_api_key: Callable[..., str],
    wrapper: FakeWrapper,
) -> RunSnippet:
    """``run_snippet()``: one page's block, as its page shows it but for the deployment's values,
    against the service with an API key of the ``messages`` scope alone (all the block needs)."""
    snippet: Snippet = request.param
    found = executable(snippet.client)
    api_key = new_api_key("app", "messages")
    service = start_service("--no-sweep", "--api-keys", str(api_keys_file))
    swaps = {SERVICE_URL: service.url, WRAPPER_URL: wrapper.url}
    # The user key is not swapped, but the login the test stores must be the one it calls for.
    check_shown(snippet.block.body, {USER_KEY: USER_KEY}, snippet.id, OWNER)
    source = stand_in(snippet.block.body, swaps, snippet.id, OWNER)
    directory = workspace(tmp_path / "app")
    script = directory / SCRIPT_NAMES[snippet.client]
    script.write_text(source, encoding="utf-8")
    return lambda: run([found, script.name], directory, {"CREDKEEPER_API_KEY": api_key})


def test_a_snippet_prints_the_wrappers_reply(
    run_snippet: RunSnippet, login: Callable[..., Credentials]
) -> None:
    """The block prints the reply to "Hello" for the user's stored login, and exits 0."""
    login(USER_KEY)
    assert Outcome(0, REPLY, "") == run_snippet()


def test_a_snippet_takes_its_reauth_branch_for_a_dead_login(
    run_snippet: RunSnippet,
    login: Callable[..., Credentials],
    fake: FakeProvider,
    wrapper: FakeWrapper,
) -> None:
    """A login whose refresh token the provider refused is reauth_required: the block's own
    branch, which prints nothing and exits 0, with the wrapper never called."""
    fake.revoke(login(USER_KEY, expires_in=-10))
    assert (Outcome(0, "", ""), 0) == (run_snippet(), len(wrapper.calls))


def test_a_snippet_lets_any_other_failure_escape(run_snippet: RunSnippet) -> None:
    """Without a login the service's credential_not_found is no re-auth: the block rethrows the
    CredkeeperError, which ends the program with a failure (PHP reports it on stdout or stderr
    as its php.ini says)."""
    outcome = run_snippet()
    escaped = "CredkeeperError: credential_not_found: " in outcome.stdout + outcome.stderr
    assert (True, True) == (outcome.returncode != 0, escaped)


# -- the READMEs' console blocks ------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A ``$`` line of a console block (continuation lines joined) and the output shown under it."""

    page: str
    block: int  # the line of its block's opening fence
    line: int
    text: str
    output: str

    @property
    def id(self) -> str:
        """``page:line``, the test id that points at the command."""
        return f"{self.page}:{self.line}"

    @property
    def words(self) -> list[str]:
        """The command's words, as the shell splits them."""
        return shlex.split(self.text)

    @property
    def client(self) -> str | None:
        """``node`` or ``php`` when the command runs that language's example program, else None."""
        pairs = list(itertools.pairwise(self.words))
        for language, (name, program, _, _) in CLIENTS.items():
            if (name, program.name) in pairs:
                return language
        return None

    def promised(self) -> Outcome:
        """What the README says the command does: a failure exits 1 with its ``code: detail``
        on stderr; anything else is the reply, printed with exit 0."""
        if PROBLEM_LINE.match(self.output):
            return Outcome(1, "", self.output)
        return Outcome(0, self.output, "")


def console_commands(page: str) -> Iterator[Command]:
    """The commands of a page's console blocks, in page order."""
    for block in page_blocks(page):
        if block.language != "console":
            continue
        text: list[str] = []
        output: list[str] = []
        line = 0
        for offset, row in enumerate(block.lines):
            continued = bool(text) and text[-1].endswith("\\")
            if continued:
                text.append(row)
            elif row.startswith("$ "):
                if text:
                    yield Command(page, block.line, line, "\n".join(text), "".join(output))
                text, output, line = [row[2:]], [], block.line + 1 + offset
            else:
                output.append(row + "\n")
        if text:
            yield Command(page, block.line, line, "\n".join(text), "".join(output))


@dataclass(frozen=True)
class Session:
    """What a README has its reader type: the setup it shows (the scopes of its ``credkeeper
    apikey create`` line, the keys of its ``credkeeper import --key`` lines), then, in order,
    the ``export`` lines and program runs of its console blocks that run the example program."""

    page: str
    scopes: tuple[str, ...]
    logins: tuple[str, ...]
    commands: tuple[Command, ...]

    @property
    def runs(self) -> list[Command]:
        """The commands that run the example program."""
        return [command for command in self.commands if command.client is not None]

    def exports_before(self, command: Command) -> list[str]:
        """The ``export`` lines the reader has typed when they reach ``command``."""
        before = self.commands[: self.commands.index(command)]
        return [earlier.text for earlier in before if earlier.words[0] == "export"]


def session(page: str) -> Session:
    """The session ``page`` shows."""
    commands = list(console_commands(page))
    scopes: list[str] = []
    logins: list[str] = []
    for command in commands:
        words = command.words
        if words[:3] == ["credkeeper", "apikey", "create"]:
            scopes += [value for option, value in itertools.pairwise(words) if option == "--scope"]
        if words[:2] == ["credkeeper", "import"] and "--key" in words:
            logins.append(words[words.index("--key") + 1])
    # The service's own exports (CREDKEEPER_KEYS) sit in the blocks that start it.
    running = {command.block for command in commands if command.client is not None}
    typed = tuple(
        command
        for command in commands
        if command.block in running and (command.client or command.words[0] == "export")
    )
    return Session(page, tuple(scopes), tuple(logins), typed)


SESSIONS = {page: session(page) for page in README_PAGES}
RUNS = [command for page in README_PAGES for command in SESSIONS[page].runs]


@pytest.mark.parametrize("command", RUNS, ids=lambda command: command.id)
def test_a_readme_command_prints_what_the_readme_shows(
    command: Command,
    tmp_path: Path,
    start_service: Callable[..., Service],
    api_keys_file: Path,
    new_api_key: Callable[..., str],
    login: Callable[..., Credentials],
    wrapper: FakeWrapper,
) -> None:
    """After the page's ``export`` lines, the command prints what the page shows under it and
    exits as the README says; the page's API key scopes and logins are set up first, and the
    wrapper's model answers with the reply the page shows."""
    assert command.client is not None
    executable(command.client)
    page = SESSIONS[command.page]
    if not page.scopes or not page.logins:
        pytest.fail(f"{page.page} no longer shows its `apikey create` and `import --key` lines")
    api_key = new_api_key("my-app", *page.scopes)
    for key in page.logins:
        login(key)
    service = start_service("--no-sweep", "--api-keys", str(api_keys_file))
    wrapper.reply = lambda prompt: command.output.removesuffix("\n")
    swaps = {
        SERVICE_URL: service.url,
        WRAPPER_URL: wrapper.url,
        API_KEY_PLACEHOLDER: shlex.quote(api_key),
    }
    check_shown(" ".join(typed.text for typed in page.commands), swaps, page.page, OWNER)
    script = swapped("\n".join([*page.exports_before(command), command.text]), swaps)
    assert command.promised() == run(["bash", "-c", script], workspace(tmp_path / "app"), {})


def test_every_page_shows_the_blocks_the_tests_run() -> None:
    """The service page shows a js and a php block, each README its language's block and runs
    of its program: a fence renamed or a block removed cannot leave a page untested unseen."""
    assert (
        {
            ("service.md", "node"),
            ("service.md", "php"),
            ("examples/node/README.md", "node"),
            ("examples/php/README.md", "php"),
        },
        {("examples/node/README.md", "node"), ("examples/php/README.md", "php")},
    ) == (
        {(snippet.page, snippet.client) for snippet in SNIPPETS},
        {(command.page, command.client) for command in RUNS},
    )
