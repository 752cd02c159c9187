"""Every ``credkeeper`` command line the docs show names commands and options that exist.

The pages' shell blocks are never run (most name a deployment's servers); each command line in
them is checked against the click command tree of ``credkeeper.cli`` instead, so a renamed
option or a removed command fails here rather than in a reader's terminal.

Which lines, for whoever writes a page:

- The ```console, ```bash, ```sh and ```shell blocks of README.md and of every page under docs/.
  In a block with ``$ `` prompts the prompted lines are commands and the rest is output; in a
  block without prompts every line is a command. A line ending in ``\\`` goes on on the next.
- A command is checked when its first word is ``credkeeper``, after any ``NAME=value``
  assignments and wherever it stands in a pipeline (``echo ... | credkeeper import --stdin``).
  Other commands (pip, curl, export, python, make, ...) are not.
- ``<!-- cli: not checked: <reason> -->`` on the lines above a block (blank lines and other
  comments between are allowed) skips its command lines, naming the reason.

How a line is read. Words are split as a shell splits them: a quoted string stays one word, a
``#`` starting a word begins a comment, ``|``, ``;``, ``&``, ``&&`` and ``||`` end a command,
and a redirection (``> FILE``, ``2>&1``) is dropped with its target; ``shlex`` then unquotes
each word (splitting with ``shlex`` alone would lose which words were quoted). Quoted text is
always a literal value (``--store '...'``); in bare words the synopsis notation is read:

- ``[...]`` an optional part, nested as needed: ``[--output FILE [--force]]``;
- ``A | B`` alternatives, inside brackets only (a bare ``|`` outside them is a pipe):
  ``[PATH | -]``;
- ``...`` after a placeholder or a bracket (or as a word of its own) repeats what precedes:
  ``KEY...``, ``[--scope SCOPE]...``; elsewhere it abbreviates a value (``whsec_...``);
- an UPPERCASE word (``KEY``, ``FILE``, ``URL``, ``@FILE``, ``N``) is a placeholder: it stands
  for a value, so it fills an option or an argument but is not converted.

A line expands to every command it allows (each optional part present or absent, each
alternative, a repeated part twice), and each is parsed by click: the command's own parser
(unknown options, a missing value, a flag given one), its subcommand lookup, its parameter
types for every literal value (a ``Choice``, a duration, a range), its required parameters,
and no argument left over. A command with no placeholder is then parsed once more by
``make_context`` level by level, exactly as ``credkeeper`` would before running it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import click
import pytest
from click.exceptions import NoSuchCommand

from credkeeper.cli import cli
from tests.markdown import README, ROOT, fenced, pages

SHELLS = {"console", "bash", "sh", "shell"}
MARKER = re.compile(r"^\s*<!--\s*cli:\s*not checked:\s*(?P<reason>.*?)\s*-->\s*$")
COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
PROMPT = re.compile(r"^\s*\$ ")
TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>\#.*)
      | (?P<redirect>\d*(?:>>?|<)&?)
      | (?P<operator>\|\||&&|[|;&])
      | (?P<word>(?:[^\s'"\\|;&<>]|\\.|'[^']*'|"(?:[^"\\]|\\.)*")+)
    )""",
    re.VERBOSE,
)
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"@?[A-Z][A-Z0-9_]*")


@dataclass(frozen=True)
class CommandLine:
    """One command line of a page's shell block: where it starts, its text, why it is skipped."""

    page: str
    line: int
    text: str
    skip: str = ""

    @property
    def id(self) -> str:
        """``page:line``, the test id that points at the line."""
        return f"{self.page}:{self.line}"


@dataclass(frozen=True)
class Word:
    """A shell word as the command receives it; only a ``bare`` (unquoted) one holds notation."""

    text: str
    bare: bool = True

    @property
    def placeholder(self) -> bool:
        """An UPPERCASE bare word, standing for a value the reader supplies."""
        return self.bare and PLACEHOLDER.fullmatch(self.text) is not None


# The synopsis symbols a bare word may carry around its text.
OPEN, CLOSE, ALTERNATIVE, REPEAT = "[", "]", "|", "..."
# A synopsis: words, and optional parts, each one its alternatives (sequences of nodes).
Node: TypeAlias = "Word | Choices"
Choices: TypeAlias = "tuple[list[Node], ...]"


def command_lines(path: Path, root: Path = ROOT) -> Iterator[CommandLine]:
    """The command lines of one page's shell blocks, continuations joined, output left out."""
    page = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    for block in fenced(lines):
        if block.language in SHELLS:
            yield from _block_lines(page, block.line, block.lines, _reason(lines, block.line - 1))


def _reason(lines: list[str], fence: int) -> str:
    """The reason of a ``cli: not checked`` marker among the comments above the fence, or ''."""
    above = fence - 1
    while above >= 0 and (not lines[above].strip() or COMMENT.match(lines[above])):
        marker = MARKER.match(lines[above])
        if marker is not None:
            return marker["reason"] or "no reason given"
        above -= 1
    return ""


def _block_lines(page: str, start: int, body: tuple[str, ...], skip: str) -> Iterator[CommandLine]:
    """The command lines of a block whose ``body`` starts on line ``start + 1`` of ``page``."""
    prompted = any(PROMPT.match(line) for line in body)
    index = 0
    while index < len(body):
        first = index
        text = body[index]
        index += 1
        if prompted and not PROMPT.match(text):
            continue
        while text.rstrip().endswith("\\") and index < len(body):
            text = text.rstrip()[:-1] + " " + body[index].strip()
            index += 1
        text = PROMPT.sub("", text, count=1).strip()
        if text:
            yield CommandLine(page, start + first + 1, text, skip)


def words(text: str) -> list[Word]:
    """The shell words of ``text``; operators and redirections are bare words of their own."""
    found: list[Word] = []
    position = 0
    while text[position:].strip():
        token = TOKEN.match(text, position)
        if token is None:
            raise ValueError(f"cannot split {text[position:]!r} into words (an unclosed quote?)")
        position = token.end()
        if token["comment"] is not None:
            break
        raw = token["redirect"] or token["operator"] or token["word"]
        quoted = token["word"] is not None and any(mark in raw for mark in "'\"\\")
        found.append(Word(shlex.split(raw)[0], bare=False) if quoted else Word(raw))
    return found


def commands(text: str) -> list[list[Word]]:
    """The arguments of each ``credkeeper`` command the shell line ``text`` runs, in order."""
    segment: list[Word] = []
    segments = [segment]
    depth = 0
    redirected = False
    for word in words(text):
        if redirected:
            redirected = False
        elif word.bare and re.fullmatch(r"\d*(>>?|<)&?", word.text):
            redirected = True
        elif word.bare and depth == 0 and word.text in {"|", "||", "&&", ";", "&"}:
            segment = []
            segments.append(segment)
        else:
            if word.bare:
                depth += word.text.count(OPEN) - word.text.count(CLOSE)
            segment.append(word)
    found = []
    for each in segments:
        while each and each[0].bare and ASSIGNMENT.match(each[0].text):
            each.pop(0)
        if each and each[0].text == "credkeeper":
            found.append(each[1:])
    return found


def _symbols(arguments: list[Word]) -> list[Word | str]:
    """The words with their synopsis symbols split off (``[--force]]`` gives ``[``, ``--force``,
    ``]``, ``]``); a quoted word is left whole."""
    found: list[Word | str] = []
    for word in arguments:
        if not word.bare:
            found.append(word)
            continue
        text = word.text
        if text == ALTERNATIVE:
            found.append(ALTERNATIVE)
            continue
        while text.startswith(OPEN):
            found.append(OPEN)
            text = text[1:]
        closing: list[str] = []
        while text.endswith(CLOSE) or _repeats(text):
            symbol = CLOSE if text.endswith(CLOSE) else REPEAT
            closing.insert(0, symbol)
            text = text[: -len(symbol)]
        if text:
            found.append(Word(text))
        found.extend(closing)
    return found


def _repeats(text: str) -> bool:
    """Whether ``text`` ends in a repetition: ``...``, ``KEY...`` or ``]...``; not ``whsec_...``,
    a value the page abbreviates."""
    if not text.endswith(REPEAT):
        return False
    before = text.removesuffix(REPEAT)
    return not before or before.endswith(CLOSE) or Word(before).placeholder


def _sequence(symbols: list[Word | str], position: int, depth: int) -> tuple[Choices, int]:
    """The alternatives from ``position`` to the bracket closing ``depth``, and where it ends."""
    alternatives: list[list[Node]] = [[]]
    while position < len(symbols):
        symbol = symbols[position]
        position += 1
        current = alternatives[-1]
        if symbol == OPEN:
            inner, position = _sequence(symbols, position, depth + 1)
            current.append(inner)
        elif symbol == CLOSE:
            if depth == 0:
                raise ValueError("a ']' closes no '['")
            return tuple(alternatives), position
        elif symbol == ALTERNATIVE:
            alternatives.append([])
        elif symbol == REPEAT:
            if not current:
                raise ValueError("'...' repeats nothing")
            current.append(current[-1])
        else:
            assert isinstance(symbol, Word)
            current.append(symbol)
    if depth:
        raise ValueError("a '[' is never closed")
    return tuple(alternatives), position


def _expand(sequence: list[Node]) -> list[list[Word]]:
    """Every word list ``sequence`` allows: each optional part absent or as each alternative."""
    found: list[list[Word]] = [[]]
    for node in sequence:
        if isinstance(node, Word):
            choices = [[node]]
        else:
            choices = [[], *(form for alternative in node for form in _expand(alternative))]
        found = [form + choice for form in found for choice in choices]
    return found


def forms(text: str) -> list[list[Word]]:
    """The commands (arguments after ``credkeeper``) a shell line shows, none for another
    program. A synopsis gives several: ``sweep [--json]`` is ``sweep`` and ``sweep --json``."""
    unique: list[list[Word]] = []
    for arguments in commands(text):
        (sequence,), _ = _sequence(_symbols(arguments), 0, 0)
        unique.extend(form for form in _expand(sequence) if form not in unique)
    return unique


@dataclass(frozen=True)
class _Level:
    """One command of a resolved path (the root group, a subcommand, ...) and its arguments."""

    command: click.Command
    name: str
    args: list[str]


def problems(line: CommandLine) -> list[str]:
    """What is wrong with ``line`` against the command tree, one message per problem."""
    try:
        found = forms(line.text)
    except ValueError as exc:
        return [f"{line.id}: `{line.text}`: {exc}"]
    messages: list[str] = []
    for form in found:
        problem = _check(form)
        if problem is not None and problem not in messages:
            messages.append(problem)
    return [f"{line.id}: `{line.text}`: {message}" for message in messages]


def _check(form: list[Word]) -> str | None:
    """The problem click finds in one command, or None when ``credkeeper`` would accept it."""
    placeholders = {word.text for word in form if word.placeholder}
    levels: list[_Level] = []
    command: click.Command = cli
    name, args = "credkeeper", [word.text for word in form]
    parent: click.Context | None = None
    while True:
        ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
        try:
            opts, rest, _ = command.make_parser(ctx).parse_args(list(args))
            params = command.get_params(ctx)
            if any(isinstance(p, click.Option) and p.is_eager and p.name in opts for p in params):
                return None  # --help or --version: the run ends there, whatever follows
            _check_values(ctx, opts, placeholders)
            levels.append(_Level(command, name, args))
            if not isinstance(command, click.Group):
                if rest:
                    ctx.fail(f"Got unexpected extra argument(s) ({' '.join(rest)})")
                break
            if not rest:
                ctx.fail("Missing command.")
            sub_name, sub, args = command.resolve_command(ctx, rest)
            assert sub_name is not None
            assert sub is not None
        except click.ClickException as exc:
            return _describe(exc, ctx)
        parent, command, name = ctx, sub, sub_name
    return None if placeholders else _make_contexts(levels)


def _check_values(ctx: click.Context, opts: dict[str, object], placeholders: set[str]) -> None:
    """Each required parameter has a value, and each literal value converts to its type."""
    options = _option_names(ctx.command, ctx)
    for param in ctx.command.get_params(ctx):
        raw = opts.get(param.name or "")
        given = [v for v in (raw if isinstance(raw, list | tuple) else [raw]) if isinstance(v, str)]
        if param.required and not given and not param.envvar:
            raise click.MissingParameter(ctx=ctx, param=param)
        for value in given:
            if value in options:
                hint = param.get_error_hint(ctx)
                message = f"{hint} takes a value, not the option {value}"
                raise click.BadOptionUsage(value, message, ctx=ctx)
            if value not in placeholders:
                param.type.convert(value, param, ctx)


def _make_contexts(levels: list[_Level]) -> str | None:
    """Parse the command as ``credkeeper`` does before running it: ``make_context`` per level."""
    parent: click.Context | None = None
    try:
        for level in levels:
            parent = level.command.make_context(level.name, list(level.args), parent=parent)
    except click.ClickException as exc:
        return _describe(exc, parent)
    return None


def _options(command: click.Command, ctx: click.Context) -> list[list[str]]:
    """The names of each option ``command`` takes: ``[["-o", "--output"], ["--force"], ...]``."""
    return [
        [*param.opts, *param.secondary_opts]
        for param in command.get_params(ctx)
        if isinstance(param, click.Option)
    ]


def _option_names(command: click.Command, ctx: click.Context) -> list[str]:
    return [name for names in _options(command, ctx) for name in names]


def _describe(exc: click.ClickException, fallback: click.Context | None) -> str:
    """click's message, with the command it is about and what that command does take."""
    ctx = getattr(exc, "ctx", None) or fallback
    if ctx is None:
        return exc.format_message()
    message = f"{ctx.command_path}: {exc.format_message()}"
    if isinstance(exc, NoSuchCommand):
        names = sorted(ctx.command.commands) if isinstance(ctx.command, click.Group) else []
        return f"{message} ({ctx.command_path}'s commands: {', '.join(names)})"
    if not isinstance(exc, click.NoSuchOption | click.BadOptionUsage):
        return message
    known = []
    each: click.Context | None = ctx
    while each is not None:
        options = _options(each.command, each)
        known.append(f"{each.command_path} takes {', '.join('/'.join(o) for o in options)}")
        if each is not ctx and any(exc.option_name in names for names in options):
            message += f" ({exc.option_name} is {each.command_path}'s: put it before the command)"
        each = each.parent
    return f"{message} ({'; '.join(known)})"


def runs_credkeeper(line: CommandLine) -> bool:
    """Whether the line runs ``credkeeper``; one that cannot be split but names it does, to fail."""
    try:
        return bool(commands(line.text))
    except ValueError:
        return "credkeeper" in line.text


ALL = [line for path in [README, *pages()] for line in command_lines(path)]
CHECKED = [line for line in ALL if runs_credkeeper(line)]


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(
            line,
            id=line.id,
            marks=[pytest.mark.skip(reason=f"{line.id} not checked: {line.skip}")]
            if line.skip
            else [],
        )
        for line in CHECKED
    ],
)
def test_command_line_matches_the_cli(line: CommandLine) -> None:
    """Each form of the line names a command that exists, with options it takes, valued right."""
    assert [] == problems(line)


def _texts(text: str) -> list[list[str]]:
    """The forms of ``text`` as plain argument lists."""
    return [[word.text for word in form] for form in forms(text)]


def _problem(text: str) -> str:
    """The one problem of the command line ``text``, without the ``page:line: `text`: `` prefix."""
    (message,) = problems(CommandLine("page.md", 1, text))
    return message.removeprefix(f"page.md:1: `{text}`: ")


def _page(tmp_path: Path, text: str) -> list[CommandLine]:
    """The command lines of a page made of ``text``."""
    page = tmp_path / "page.md"
    page.write_text(text, encoding="utf-8")
    return list(command_lines(page, root=tmp_path))


class TestReading:
    """How the pages' shell blocks become commands."""

    def test_a_synopsis_expands_to_every_form_it_allows(self) -> None:
        """Each optional part is present or absent, nested parts only inside theirs."""
        expected = [
            ["export"],
            ["export", "--output", "FILE"],
            ["export", "--output", "FILE", "-f"],
        ]
        assert expected == _texts("credkeeper export [--output FILE [-f]]")

    def test_alternatives_give_one_form_each(self) -> None:
        """``[A | B]`` is absent, A or B."""
        expected = [["show", "KEY"], ["show", "KEY", "--json"], ["show", "KEY", "-"]]
        assert expected == _texts("credkeeper show KEY [--json | -]")

    def test_a_repeated_part_appears_twice(self) -> None:
        """``...`` repeats the placeholder or bracket before it, so a command taking one fails."""
        expected = [["refresh", "KEY", "KEY"], ["rekey"], ["rekey", "-v"], ["rekey", "-v", "-v"]]
        assert expected == _texts("credkeeper refresh KEY... ; credkeeper rekey [-v]...")

    def test_an_abbreviated_value_is_not_a_repetition(self) -> None:
        """``whsec_...`` is a value the page shortens, passed as written."""
        assert [["serve", "--webhook-secret", "whsec_..."]] == _texts(
            "credkeeper serve --webhook-secret whsec_..."
        )

    def test_quoted_text_is_a_value_not_notation(self) -> None:
        """``'...'`` and ``'[x]'`` are values as the shell passes them."""
        expected = [["--store", "...", "show", "[x] y"]]
        assert expected == _texts("credkeeper --store '...' show \"[x] y\"")

    def test_the_shell_around_credkeeper_is_left_out(self) -> None:
        """Assignments, the other commands of a pipeline, redirections and comments."""
        expected = [["export", "--force"]]
        assert expected == _texts("echo x | A=1 credkeeper export > f.jsonl --force # all")

    def test_other_programs_are_not_checked(self) -> None:
        """pip, make, python and export lines name credkeeper without running it."""
        lines = [
            "pip install 'credkeeper[cli]'",
            "make demo   # `credkeeper demo`",
            "python -m credkeeper status",
            "export CREDKEEPER_KEYS=@~/keys",
        ]
        assert [[]] * len(lines) == [_texts(line) for line in lines]

    def test_output_lines_of_a_prompted_block_are_not_commands(self, tmp_path: Path) -> None:
        """Beside ``$`` lines, a line is output, even one starting with ``credkeeper``."""
        text = "```console\n$ credkeeper status\ncredkeeper status: 2 keys\n$ echo $?\n4\n```\n"
        found = [(line.line, line.text) for line in _page(tmp_path, text)]
        assert [(2, "credkeeper status"), (4, "echo $?")] == found

    def test_every_line_of_a_block_without_prompts_is_a_command(self, tmp_path: Path) -> None:
        """A block with no ``$`` is commands only, continued lines joined."""
        text = "```sh\ncredkeeper --store x \\\n    status\ncredkeeper rekey\n```\n"
        found = [(line.line, line.text) for line in _page(tmp_path, text)]
        assert [(2, "credkeeper --store x  status"), (4, "credkeeper rekey")] == found

    def test_the_marker_skips_a_block_naming_why(self, tmp_path: Path) -> None:
        """``<!-- cli: not checked: reason -->`` above a block, comments between allowed."""
        text = (
            "<!-- cli: not checked: a plugin's command -->\n\n<!-- other -->\n"
            "```console\n$ credkeeper plugin run\n```\n\n```console\n$ credkeeper rekey\n```\n"
        )
        found = [(line.text, line.skip) for line in _page(tmp_path, text)]
        assert [("credkeeper plugin run", "a plugin's command"), ("credkeeper rekey", "")] == found


class TestChecking:
    """What a command line is held to, and what its failure says."""

    def test_a_misspelt_option_names_the_page_line_command_and_known_options(
        self, tmp_path: Path
    ) -> None:
        """The message points at the line and the option, and lists what the command takes."""
        (line,) = _page(tmp_path, "Sweep:\n\n```console\n$ credkeeper sweep --windw 30m\n```\n")
        (message,) = problems(line)
        expected = (
            "page.md:4: `credkeeper sweep --windw 30m`: credkeeper sweep: "
            "No such option '--windw'. Did you mean '--window'? "
            "(credkeeper sweep takes --window, "
        )
        assert expected == message[: len(expected)]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("credkeeper sweeep", "credkeeper: No such command 'sweeep'. Did you mean 'sweep'?"),
            ("credkeeper apikey creat x", "credkeeper apikey: No such command 'creat'."),
            ("credkeeper status --json=yes", "credkeeper status: Option '--json' does not take"),
            ("credkeeper status --json yes", "credkeeper status: Got unexpected extra argument"),
            ("credkeeper sweep --window", "credkeeper sweep: Option '--window' requires an"),
            ("credkeeper sweep --window --json", "credkeeper sweep: '--window' takes a value,"),
            ("credkeeper sweep --window 30x", "credkeeper sweep: Invalid value for '--window'"),
            ("credkeeper apikey create a --scope mesages", "credkeeper apikey create: Invalid"),
            ("credkeeper import [--key KEY]", "credkeeper import: Missing option '--key'."),
            ("credkeeper refresh KEY...", "credkeeper refresh: Got unexpected extra argument"),
            ("credkeeper status --store x", "credkeeper status: No such option '--store'."),
            ("credkeeper", "credkeeper: Missing command."),
            ("credkeeper show [KEY", "a '[' is never closed"),
        ],
    )
    def test_a_command_click_would_refuse_fails(self, text: str, expected: str) -> None:
        """An unknown command, a value too many or missing, a bad literal, a missing part."""
        assert expected == _problem(text)[: len(expected)]

    def test_a_global_option_after_the_command_is_told_where_it_goes(self) -> None:
        """``--store`` after ``status`` belongs to ``credkeeper``, before the command."""
        expected = "(--store is credkeeper's: put it before the command)"
        assert expected in _problem("credkeeper status --store x")

    def test_each_credkeeper_command_of_a_line_is_checked(self) -> None:
        """``credkeeper export | credkeeper import --stdin`` is two commands."""
        expected = [["export"], ["import", "--stdin"]]
        assert expected == _texts("credkeeper export | credkeeper import --stdin")

    def test_placeholders_fill_typed_options_unconverted(self) -> None:
        """``--window DURATION`` and ``--scope SCOPE`` stand for values, valid as written."""
        line = "credkeeper sweep --window DURATION && credkeeper apikey create N --scope SCOPE"
        assert [] == problems(CommandLine("page.md", 1, line))

    def test_make_context_refuses_what_credkeeper_would(self) -> None:
        """The second parse, click's own ``make_context`` per level, reports in the same words."""
        levels = [
            _Level(cli, "credkeeper", ["sweep", "--window", "soon"]),
            _Level(cli.commands["sweep"], "sweep", ["--window", "soon"]),
        ]
        expected = "credkeeper sweep: Invalid value for '--window': 'soon' is not a duration"
        assert expected == (_make_contexts(levels) or "")[: len(expected)]

    def test_help_and_version_end_the_command(self) -> None:
        """``credkeeper --help`` needs no command after it."""
        lines = ["credkeeper --help", "credkeeper -V", "credkeeper sweep -h"]
        assert [[]] * len(lines) == [problems(CommandLine("p.md", 1, line)) for line in lines]


def test_the_pages_with_commands_are_scanned() -> None:
    """The pages showing credkeeper commands are all found, so a moved page fails loudly."""
    found = {line.page for line in CHECKED}
    expected = {"docs/cli.md", "docs/quickstart.md", "docs/service.md", "docs/stores/sql.md"}
    assert expected == expected & found
