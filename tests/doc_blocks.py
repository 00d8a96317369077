"""The fenced code blocks of README.md and docs/*.md, and how each is checked.

Every block is checked by its language, so the docs cannot drift from the code:

* ``yaml``: parses; a mapping with agent-file keys is validated as an agent file,
  one with scenario keys as a scenario (``${ENV}`` references stand for any value);
* ``python``: compiles, then runs in a fresh interpreter (a block with ``test_``
  functions runs under pytest, outside this project's pytest settings);
* ``sh`` / ``bash`` / ``console``: each ``callbrain`` command line parses against
  the real command (the command and its options exist), ``make`` names a target of
  the Makefile, ``python path.py`` an existing file; ``callbrain check`` / ``test``
  on files of the repository and ``--help`` are run;
* anything else must be marked.

``<!-- not-run: reason -->`` on the line before a block skips it (a reason is
required); ``<!-- file: path -->`` says the block is that file of the repository,
character for character.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer.main
import yaml

from callbrain.agent import Agent
from callbrain.cli import app
from callbrain.testing.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CALLBRAIN = str(Path(sys.executable).with_name("callbrain"))

_FENCE = re.compile(r"^(`{3,})([\w+-]*)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
_MARK = re.compile(r"<!--\s*(not-run|file)\s*:?\s*(.*?)\s*-->\s*$")
_ENV = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\}")
_SHELLS = {"sh", "bash", "console", "shell"}
_SCENARIO_ONLY = set(Scenario.model_fields) - {"name"}
_AGENT_KEYS = set(Agent.model_fields)
# Commands a shell block may use besides callbrain, make and python.
_OTHER_COMMANDS = {"pip", "git", "cd", "export", "printf", "curl", "echo"}


class DocBlockError(AssertionError):
    """A block that does not match the code."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    text: str
    mark: str | None  # "not-run" or "file"
    mark_value: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path, text: str | None = None) -> list[Block]:
    text = page.read_text(encoding="utf-8") if text is None else text
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        found.append(
            Block(
                page,
                line,
                match.group(2).lower(),
                match.group(3),
                mark.group(1) if mark else None,
                mark.group(2) if mark else "",
            )
        )
    return found


def check(block: Block) -> None:
    """Raise :class:`DocBlockError` when ``block`` does not hold."""
    if block.mark == "not-run":
        if not block.mark_value:
            raise DocBlockError(f"{block.where}: <!-- not-run --> without a reason")
        return
    if block.mark == "file":
        path = ROOT / block.mark_value
        if not path.is_file() or path.read_text(encoding="utf-8") != block.text:
            raise DocBlockError(f"{block.where}: differs from {block.mark_value}")
    if block.language in ("yaml", "yml"):
        check_yaml(block)
    elif block.language == "python":
        check_python(block)
    elif block.language in _SHELLS:
        check_shell(block)
    else:
        raise DocBlockError(
            f"{block.where}: a {block.language or 'plain'} block cannot be checked: "
            "give it a language (yaml, python, sh) or mark it <!-- not-run: reason -->"
        )


def check_yaml(block: Block) -> None:
    try:
        data = yaml.safe_load(block.text)
    except yaml.YAMLError as exc:
        raise DocBlockError(f"{block.where}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        return
    data = _placeholders(data)
    keys = set(data)
    try:
        if keys & _SCENARIO_ONLY:
            Scenario.model_validate(data)
        elif keys & _AGENT_KEYS:
            Agent.from_dict(data, source=block.where)
    except Exception as exc:
        raise DocBlockError(f"{block.where}: {exc}") from None


def _placeholders(value: Any) -> Any:
    """``${ENV}`` references as a value, as if the environment had them."""
    if isinstance(value, dict):
        return {k: _placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v) for v in value]
    if isinstance(value, str):
        return _ENV.sub("placeholder", value)
    return value


def check_python(block: Block) -> None:
    try:
        compile(block.text, block.where, "exec")
    except SyntaxError as exc:
        raise DocBlockError(f"{block.where}: {exc}") from None
    with tempfile.TemporaryDirectory() as folder:
        if re.search(r"^(async )?def test_", block.text, re.M):
            Path(folder, "test_block.py").write_text(block.text, encoding="utf-8")
            # -c /dev/null: the user's own pytest settings, not this project's.
            args = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-c", os.devnull]
            args += ["-p", "no:cacheprovider", "test_block.py"]
        else:
            args = [sys.executable, "-c", block.text]
        _run(block, args, cwd=Path(folder))


def check_shell(block: Block) -> None:
    for line in _logical_lines(block.text):
        for words in _commands(line):
            while words and re.fullmatch(r"\w+=.*", words[0]):
                words = words[1:]  # VAR=value command
            if not words:
                continue
            program = Path(words[0]).name
            if program == "callbrain":
                check_callbrain(block, words[1:])
            elif program == "make":
                check_make(block, words[1:])
            elif program in ("python", "python3"):
                if len(words) > 1 and words[1].endswith(".py") and not (ROOT / words[1]).is_file():
                    raise DocBlockError(f"{block.where}: no file {words[1]}")
            elif program not in _OTHER_COMMANDS:
                raise DocBlockError(f"{block.where}: unknown command {program!r} ({line})")


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: split at | && || ; and without redirections."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if token in ("|", "||", "&&", ";", "&"):
            commands.append([])
        elif token in (">", ">>", "<", "2>"):
            redirect = True
        elif redirect:
            redirect = False
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _logical_lines(text: str) -> list[str]:
    return [line for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def check_callbrain(block: Block, args: list[str]) -> None:
    group: Any = typer.main.get_command(app)
    if "--help" in args or "--version" in args:
        _run(block, [CALLBRAIN, *args], cwd=ROOT)
        return
    command, rest, ctx, name = group, list(args), None, "callbrain"
    try:
        while hasattr(command, "commands"):  # a group: find its subcommand
            ctx = command.make_context(name, list(rest), parent=ctx)
            # typer's own copy of click keeps the subcommand's name apart
            protected = getattr(ctx, "_protected_args", getattr(ctx, "protected_args", []))
            rest = [*protected, *ctx.args]
            name, command, rest = command.resolve_command(ctx, rest)
        command.make_context(name, list(rest), parent=ctx)  # click consumes the list
    except typer.Exit:
        return
    except typer.TyperException as exc:
        raise DocBlockError(f"{block.where}: callbrain {shlex.join(args)}: {exc}") from None
    if name in ("check", "test") and "--live" not in args and "--url" not in args:
        paths = [a for a in rest if not a.startswith("-") and ("/" in a or a.endswith(".yaml"))]
        if paths and all((ROOT / p).exists() for p in paths):
            _run(block, [CALLBRAIN, *args], cwd=ROOT)


def check_make(block: Block, args: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for target in (a for a in args if "=" not in a and not a.startswith("-")):
        if target not in targets:
            raise DocBlockError(f"{block.where}: make {target}: no such target in the Makefile")


def _run(block: Block, args: list[str], *, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env.update(OPENAI_API_KEY="test", ANTHROPIC_API_KEY="test", COLUMNS="200")
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-2000:]
        raise DocBlockError(f"{block.where}: exit status {done.returncode}:\n{output}")
