"""The README's Python examples run as written (so the documented API cannot drift from the code)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


# ---- CI runs the README's commands -------------------------------------------------------------------------
CI_SCRIPT = README.parent / ".ci" / "run"


def _bash_commands(block: str) -> list[str]:
    """The command lines of a bash block (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def _readme_section_bash(title: str) -> list[str]:
    section = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README.read_text(), flags=re.S | re.M)
    assert section, f"README.md has no '## {title}' section"
    return re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)


def test_ci_installs_and_tests_with_the_readmes_commands():
    """A missing install step must turn CI red: .ci/run's main environment is set up with exactly the
    README's install lines (in order, nothing in between) and runs exactly the README's test command."""
    install = _bash_commands(_readme_section_bash("Install")[0])
    assert install == ["pip install torch==2.13.0", 'pip install -e ".[test]"'], install
    ci = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    starts = [i for i in range(len(ci)) if ci[i : i + len(install)] == install]
    assert starts, f".ci/run does not contain the README's install lines {install} in a row"
    (test_command,) = _bash_commands(_readme_section_bash("Test")[0])
    assert test_command == "python -m pytest -q"
    assert test_command in ci[starts[0] :], ".ci/run does not run the README's test command after installing"
