"""The user documentation (README.md and docs/) stays true: every relative link and anchor resolves, every
``patchrec ...`` command in a bash block parses with the real CLI, every Python example runs, and nothing
points outside the repository."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from patchrec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def outside_code(text: str) -> str:
    return FENCE.sub("", text)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_and_anchors_resolve(page):
    for target in LINK.findall(outside_code(page.read_text())):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link {target} -> {resolved} does not exist"
        assert ROOT in resolved.parents or resolved == ROOT, f"{page.name}: {target} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def bash_commands(text: str) -> list[str]:
    """``patchrec ...`` command lines of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang != "bash":
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;", line):
                words = shlex.split(part, comments=True)
                if "patchrec" in words and "..." not in words:
                    commands.append(words[words.index("patchrec") + 1 :])
    return commands


COMMANDS = [(page.name, argv) for page in PAGES for argv in bash_commands(page.read_text())]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[f"{p}:{' '.join(a[:2])}" for p, a in COMMANDS])
def test_documented_commands_parse(page, argv):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad choice
        pytest.fail(f"{page}: `patchrec {' '.join(argv)}` does not parse (exit {exc.code})")


EXAMPLES = [(page.name, i, body) for page in PAGES
            for i, (lang, body) in enumerate(FENCE.findall(page.read_text()))
            if lang == "python"]  # fmt: skip


def test_the_docs_have_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{p}[{i}]" for p, i, _ in EXAMPLES])
def test_python_examples_run(page, index, code):
    exec(compile(code, f"{page}[python block {index}]", "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_page_refers_to_developer_notes(page):
    text = page.read_text()
    for word in ("METHOD.md", "DESIGN.md", "shared/docs"):
        assert word not in text, f"{page.name} mentions {word}, which users do not have"


# ---- CI runs the README's commands -------------------------------------------------------------------------
def _readme_section_bash(title: str) -> list[list[str]]:
    """The command lines (comments and blank lines dropped) of each bash block of README section ``title``."""
    text = (ROOT / "README.md").read_text()
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, f"README.md has no '## {title}' section"
    blocks = [body for lang, body in FENCE.findall(section.group(1)) if lang == "bash"]
    commands = [[ln.split("#", 1)[0].strip() for ln in block.splitlines()] for block in blocks]
    return [[ln for ln in block if ln] for block in commands]


def test_ci_installs_and_tests_with_the_readmes_commands():
    """A missing install step must turn CI red: .ci/run's main environment is set up with exactly the
    README's install lines (in order, nothing in between) and runs exactly the README's test command."""
    install = _readme_section_bash("Install")[0]
    assert install == ["pip install torch==2.13.0", 'pip install -e ".[test]"'], install
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    starts = [i for i in range(len(ci)) if ci[i : i + len(install)] == install]
    assert starts, f".ci/run does not contain the README's install lines {install} in a row"
    (test_command,) = _readme_section_bash("Test")[0]
    assert test_command == "python -m pytest -q"
    assert test_command in ci[starts[0] :], ".ci/run does not run the README's test command after installing"
