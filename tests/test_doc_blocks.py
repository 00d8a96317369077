"""Every code block of README.md and docs/*.md holds (see doc_blocks.py), every
relative link leads somewhere, and the checker itself catches broken blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from doc_blocks import PAGES, ROOT, Block, DocBlockError, blocks, check

ALL = [block for page in PAGES for block in blocks(page)]


@pytest.mark.parametrize("block", ALL, ids=[b.where for b in ALL])
def test_the_block_holds(block: Block) -> None:
    check(block)


def test_the_pages_have_blocks() -> None:
    readme = [b for b in ALL if b.page.name == "README.md"]
    assert len(readme) >= 6
    assert any(b.mark == "file" for b in readme)
    assert len(ALL) > 60


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


BROKEN = {
    "yaml": "name: x\nllm:\n  provider: openai\n  temprature: 0.2\n",
    "scenario": "steps:\n  - caller: hi\n    expect: {sayd: [hello]}\n",
    "python": "import callbrain\nassert callbrain.no_such_thing\n",
    "pytest": "def test_fails() -> None:\n    assert 1 == 2\n",
    "syntax": "def f(:\n",
    "option": "callbrain serve --no-such-option\n",
    "command": "callbrain srve agent.yaml\n",
    "make": "make deploy\n",
    "unknown": "rm -rf /\n",
    "check": "callbrain check tests/test_docs.py\n",
}


@pytest.mark.parametrize(
    ("language", "text", "message"),
    [
        ("yaml", BROKEN["yaml"], "temprature"),
        ("yaml", BROKEN["scenario"], "sayd"),
        ("python", BROKEN["python"], "no_such_thing"),
        ("python", BROKEN["pytest"], "1 failed"),
        ("python", BROKEN["syntax"], "invalid syntax"),
        ("sh", BROKEN["option"], "No such option: --no-such-option"),
        ("sh", BROKEN["command"], "No such command 'srve'"),
        ("sh", BROKEN["make"], "no such target"),
        ("sh", BROKEN["unknown"], "unknown command 'rm'"),
        ("sh", BROKEN["check"], "exit status 2"),
        ("", "some output\n", "cannot be checked"),
    ],
)
def test_a_broken_block_fails(language: str, text: str, message: str) -> None:
    with pytest.raises(DocBlockError, match=message):
        check(Block(ROOT / "README.md", 1, language, text, None, ""))


def test_a_skip_needs_a_reason_and_a_file_block_must_match() -> None:
    page = "<!-- not-run -->\n```sh\nrm -rf /\n```\n<!-- file: Makefile -->\n```sh\nmake\n```\n"
    unmarked, copied = blocks(ROOT / "README.md", page)
    with pytest.raises(DocBlockError, match="without a reason"):
        check(unmarked)
    with pytest.raises(DocBlockError, match="differs from Makefile"):
        check(copied)
    reasoned = blocks(ROOT / "README.md", page.replace("not-run", "not-run: needs a phone"))[0]
    check(reasoned)
