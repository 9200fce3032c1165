"""The declared dependency floors are the ones CI's floor environment installs, and an unsupported
triton/numpy pair for the CPU interpreter is one clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from patchrec_kernels import patch_embed, runtime

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ROOT / ".ci" / "floors.txt"
FLOOR_TESTS = ROOT / ".ci" / "floor-tests.txt"
# pyproject floors CI cannot install here, and what it installs instead: torch's floor is a CUDA deployment's
# (no CPU wheel of it here), flash-attn needs CUDA to build.
NOT_INSTALLABLE = {"torch": "2.13.0", "flash-attn": None}


def _entries(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def release(version: str) -> tuple[int, ...]:
    """ "5.0" and "5.0.0" are the same floor."""
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def declared_floors() -> dict[str, str]:
    """name -> floor of every requirement in pyproject.toml (dependencies and every extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("patchrec[")]
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)(;.*)?", requirement.replace(" ", ""))
        assert match, f"pyproject.toml: {requirement!r} must be NAME>=FLOOR (a floor CI tests)"
        floors[match.group(1).lower()] = match.group(2)
    return floors


def test_floor_environment_installs_every_declared_floor():
    pins = {}
    for line in _entries(FLOORS):
        name, _, version = line.partition("==")
        pins[name.lower()] = version
    floors = declared_floors()
    ruff = floors.pop("ruff")  # the lint tool: .ci/run installs exactly its floor for the lint step
    assert f"pip install ruff=={ruff}" in (ROOT / ".ci" / "run").read_text()
    for name, floor in floors.items():
        if name in NOT_INSTALLABLE:
            assert pins.get(name) == NOT_INSTALLABLE[name], name
            continue
        assert name in pins, f"{FLOORS.name} does not pin {name} (pyproject.toml floor {floor})"
        assert release(pins[name]) == release(floor), \
            f"{name}: {FLOORS.name} pins {pins[name]}, pyproject.toml's floor is {floor}"
    assert set(pins) <= set(floors) | set(NOT_INSTALLABLE), "a pin without a pyproject.toml floor"


def test_floor_test_selection_names_existing_tests():
    for entry in _entries(FLOOR_TESTS):
        file, _, name = entry.partition("::")
        path = ROOT / file
        assert path.is_file(), entry
        if name:
            assert re.search(rf"^def {re.escape(name)}\(", path.read_text(), flags=re.M), entry


# ---- triton's CPU interpreter and numpy ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "ok"),
    [("3.6.0", "2.3.5", True), ("3.6.0", "2.4.0", False), ("3.6.0", "2.5.0rc1", False),
     ("3.7.0", "2.4.6", True), ("3.9.0", "2.4.6", True), ("3.6.0", "1.26.4", True)],
)  # fmt: skip
def test_interpreter_problem_names_the_unsupported_pair(triton_version, numpy_version, ok):
    problem = runtime.interpreter_problem(triton_version, numpy_version)
    if ok:
        assert problem is None
    else:
        assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
        assert "numpy<2.4 or triton>=3.7" in problem


@pytest.mark.skipif(not runtime.HAS_TRITON, reason="triton is not installed")
def test_an_op_under_an_unusable_interpreter_is_one_clear_error(monkeypatch):
    """At dispatch, before any launch: a RuntimeError with the reason, not a failure inside Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = runtime.interpreter_problem("3.6.0", "2.4.0")
    monkeypatch.setattr(runtime, "interpreter_problem", lambda: problem)
    weight = torch.randn(5, 3)
    ids = torch.tensor([0, 1, 2])
    offsets = torch.tensor([0, 1, 3])
    with pytest.raises(RuntimeError, match=r"Triton 3\.6\.0's CPU interpreter .* numpy 2\.4\.0"):
        patch_embed(weight, ids, offsets, torch.tensor([0, 2]))
    # The references need no interpreter: with it off the same call runs.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert patch_embed(weight, ids, offsets, torch.tensor([0, 2])).shape == (1, 3)
