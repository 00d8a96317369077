"""The docs cannot drift from the code: every key of the agent file, every command
and option, and every built-in variable is documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer.main
from agent_reference import END, PAGE, START, page_with_reference, undocumented

from callbrain.call.variables import BUILT_IN
from callbrain.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_agent_file_reference_is_the_generated_one() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert START in page and END in page
    assert page == page_with_reference(page), "docs/agent-file.md is stale: run `make docs`"


def test_every_key_of_the_agent_file_says_what_it_does() -> None:
    assert undocumented() == []


def test_every_built_in_variable_is_in_the_agent_file_page() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert all(f"`{name}`" in page for name in BUILT_IN)


def test_every_command_and_option_is_in_the_cli_page() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {"serve", "check", "chat", "test"} <= set(commands)
    missing = []
    for name, command in commands.items():
        if f"## `callbrain {name}`" not in page:
            missing.append(f"callbrain {name}")
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        for option in options:
            if not any(f"`{opt}" in page for opt in option.opts):
                missing.append(f"callbrain {name} {option.opts[0]}")
    assert missing == []
