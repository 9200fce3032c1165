"""Crash safety: training killed with SIGKILL (inside a step, inside a checkpoint write, one rank of a
torchrun job) resumes to exactly the uninterrupted result, and truncated or corrupted files end a command with
one line naming the file (exit 2), never a library's traceback.

The kills land where they are meant to through the test hook ``PATCHREC_KILL_AT`` (see
``patchrec.train.checkpoint.KILL_ENV``): the training process SIGKILLs itself the N-th time it reaches the
named point, so the kill is as hard as an out-of-memory killer's and its place is reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import cli_flags, logged_losses, torchrun

from patchrec.cli import main
from patchrec.data.release import write_release
from patchrec.data.synthetic import make_synthetic
from patchrec.train.checkpoint import KILL_ENV, latest_checkpoint
from patchrec.train.config import preset
from patchrec.train.loop import train

REPO = Path(__file__).resolve().parents[1]
# tests/test_train.py's small synthetic problem; two-view pretrain samples with random plans and the
# curriculum (the hardest data stream to resume), a checkpoint every 2 of the 6 steps.
SMALL = dict(data="synthetic", synthetic_users=40, synthetic_items=60, synthetic_length=16.0,
             synthetic_topics=6, tokenizer_vocab=300, max_items=12, max_rows=1600, progress=False)
RUN = dict(stage="pretrain", max_steps=6, batch_size=6, save_every=2, log_every=1)
# Timing fields of a log line: the only ones allowed to differ between a resumed and an uninterrupted run.
TIMINGS = {"rows_per_s", "tokens_per_s", "train_s"}
KILLED = -signal.SIGKILL

pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


def train_argv(out: Path, **overrides) -> list[str]:
    return ["train", *cli_flags(SMALL | RUN | overrides), "--preset", "tiny", "--out", str(out)]


def run_cli(argv: list[str], kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m patchrec ...`` in a fresh process (one thread, the ops' references), optionally with a
    kill point."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "patchrec", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def log_lines(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in ln.items() if k not in TIMINGS} for ln in lines]


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit for bit: every tensor of the two saved models is equal (and so is the tensor set)."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that every killed-and-resumed run must reproduce (in this process: same numerics as the CLI's
    one-thread process)."""
    out = tmp_path_factory.mktemp("crash") / "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        result = train(preset("tiny", **(SMALL | RUN | {"out": str(out)})))
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("TRITON_INTERPRET") if old is None else os.environ.update(TRITON_INTERPRET=old)
    assert result.model_dir is not None and sorted(result.step_losses) == list(range(1, 7))
    return out


# ---- one process, killed and resumed -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_killed_twice_and_resumed_equals_the_uninterrupted_run(uninterrupted, tmp_path, seed):
    """Killed inside a step (at a seeded step), then, resumed, killed inside a checkpoint write (a seeded one
    of its writes), then resumed to the end: the final weights are bitwise the uninterrupted run's and the log
    holds the same lines (timings aside), one per step."""
    rng = np.random.default_rng(seed)
    kill_step = int(rng.integers(3, 7))  # after the step-2 checkpoint: the resume has work to redo
    out = tmp_path / "killed"

    first = run_cli(train_argv(out), kill_at=f"step:{kill_step}")
    assert first.returncode == KILLED, first.stderr[-3000:]
    done = latest_checkpoint(out)
    assert done is not None and int(done.name.split("-")[1]) == 2 * ((kill_step - 1) // 2)
    assert not (out / "model").exists()

    writes_left = (6 - int(done.name.split("-")[1])) // 2  # checkpoints the resumed run would write
    kill_write = int(rng.integers(1, writes_left + 1))
    second = run_cli(train_argv(out) + ["--resume"], kill_at=f"checkpoint:{kill_write}")
    assert second.returncode == KILLED, second.stderr[-3000:]
    torn = list((out / "checkpoints").glob(".step-*.tmp"))
    assert len(torn) == 1 and (torn[0] / "model.safetensors").is_file()  # the kill landed inside the write
    assert not (torn[0] / "trainer_state.pt").exists()
    assert latest_checkpoint(out).name < torn[0].name[1:]  # ... and `latest` still names an older one

    third = run_cli(train_argv(out) + ["--resume"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "finished at step 6/6" in third.stdout
    assert_same_weights(uninterrupted / "model", out / "model")
    assert log_lines(out) == log_lines(uninterrupted)
    assert not list((out / "checkpoints").glob(".*"))  # the torn write was cleared by the next save


def test_kill_hook_rejects_a_malformed_setting(tmp_path):
    proc = run_cli(train_argv(tmp_path / "x", max_steps=1), kill_at="middle:1")
    assert proc.returncode == 2 and f"{KILL_ENV}='middle:1'" in proc.stderr


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(uninterrupted, tmp_path):
    """A kill inside the append of a log line leaves it without its newline; that step has no checkpoint yet,
    so resuming drops it with the other lines past the checkpoint and writes it again."""
    out = tmp_path / "torn"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "checkpoints" / "latest").write_text("step-000004\n")
    lines = (uninterrupted / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join(lines[:5]) + lines[5][:17])  # step 6's line cut mid-way
    train(preset("tiny", **(SMALL | RUN | {"out": str(out)})), resume=True)
    assert_same_weights(uninterrupted / "model", out / "model")
    assert log_lines(out) == log_lines(uninterrupted)


# ---- torchrun: one of two ranks killed ---------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_rank_ends_the_job_and_the_run_resumes(uninterrupted, tmp_path):
    """Rank 1 is SIGKILLed inside step 3 while rank 0 waits in that step's collectives: every process has
    exited within 60 s (torchrun's summary names the killed rank), and ``--resume`` on 2 ranks finishes the
    run from the step-2 checkpoint with the single-process losses."""
    out = tmp_path / "ranks"
    argv = ["-m", "patchrec", *train_argv(out), "--parallel", "ddp", "--dist-timeout", "30"]
    env = {KILL_ENV: "step:3:1"}
    start = time.perf_counter()
    proc = torchrun(argv, cwd=REPO, timeout=120, env=env)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0 and elapsed < 60, (elapsed, proc.stderr[-3000:])
    assert "Signal 9 (SIGKILL)" in proc.stderr and "local_rank: 1" in proc.stderr, proc.stderr[-3000:]
    assert latest_checkpoint(out).name == "step-000002" and not (out / "model").exists()

    run = torchrun([*argv, "--resume"], cwd=REPO, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "finished at step 6/6 on 2 ranks" in run.stdout
    want = logged_losses(uninterrupted)
    got = logged_losses(out)
    assert sorted(got) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5)


# ---- truncated and corrupted files -------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\xff\xfe garbage " * 8)


def assert_one_line_error(capsys, code: int, command: str, names: Path) -> str:
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f"patchrec {command}: error: "), err[-3000:]
    # the file's path, or its name beside a path into its directory (a cut id2title.txt shows as an unknown
    # item id on a line of sequences.jsonl, "not in id2title.txt")
    named = str(names) in lines[-1] or (names.name in lines[-1] and str(names.parent) in lines[-1])
    assert named and "Traceback" not in err, err[-3000:]
    return lines[-1]


@pytest.fixture
def run_copy(uninterrupted, tmp_path):
    """A copy of the finished run, with its newest checkpoint (step 6) to resume from."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


CHECKPOINT_FILES = [
    ("checkpoints/step-000006/model.safetensors", truncate),
    ("checkpoints/step-000006/model.safetensors", garble),
    ("checkpoints/step-000006/trainer_state.pt", truncate),
    ("checkpoints/step-000006/trainer_state.pt", garble),
    ("checkpoints/step-000006/config.json", truncate),
    ("tokenizer/tokenizer.json", truncate),
    ("tokenizer/tokenizer_config.json", garble),
    ("train_config.json", truncate),
]


@pytest.mark.parametrize(("name", "damage"), CHECKPOINT_FILES, ids=[f"{n}-{d.__name__}" for n, d in
                                                                    CHECKPOINT_FILES])
def test_resume_from_a_damaged_run_names_the_file(run_copy, capsys, name, damage):
    damage(run_copy / name)
    code = main(train_argv(run_copy) + ["--resume"])
    assert_one_line_error(capsys, code, "train", run_copy / name)


def test_a_checkpoint_without_weights_names_the_missing_file(run_copy, capsys):
    (run_copy / "checkpoints" / "step-000006" / "model.safetensors").unlink()
    code = main(train_argv(run_copy) + ["--resume"])
    weights = run_copy / "checkpoints" / "step-000006" / "model.safetensors"
    line = assert_one_line_error(capsys, code, "train", weights)
    assert "no such file" in line


@pytest.mark.parametrize("damage", [truncate, garble])
def test_eval_of_a_damaged_model_names_the_file(run_copy, capsys, damage):
    damage(run_copy / "model" / "model.safetensors")
    code = main(["eval", "--model", str(run_copy / "model"), "--data", "synthetic", "--split", "test",
                 "--limit", "2", "--no-progress", "--out", str(run_copy / "eval.json")])  # fmt: skip
    assert_one_line_error(capsys, code, "eval", run_copy / "model" / "model.safetensors")


@pytest.fixture
def release(tmp_path):
    data = make_synthetic(num_users=20, num_items=30, mean_length=10.0, num_topics=3)
    return write_release(data, tmp_path / "release")


def cut_mid_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 9])  # the last line loses its end


def keep_head(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:12])


# (A file cut exactly at a line end is a valid, shorter file: no reader can tell it from the real thing.)
DATA_FILES = [("sequences.jsonl", cut_mid_line), ("sequences.jsonl", garble), ("id2title.txt", garble),
              ("id2title.txt", keep_head), ("prompt.txt", keep_head)]


@pytest.mark.parametrize(("name", "damage"), DATA_FILES, ids=[f"{n}-{d.__name__}" for n, d in DATA_FILES])
def test_a_damaged_release_names_the_file(release, tmp_path, capsys, name, damage):
    damage(release / name)
    code = main(["train", "--stage", "vanilla", "--data", str(release), "--preset", "tiny",
                 "--max-steps", "1", "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert_one_line_error(capsys, code, "train", release / name)


def test_a_damaged_tokenizer_names_the_file(uninterrupted, tmp_path, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(uninterrupted / "tokenizer", tok)
    truncate(tok / "tokenizer.json")
    code = main(train_argv(tmp_path / "out", max_steps=1) + ["--tokenizer", str(tok)])
    assert_one_line_error(capsys, code, "train", tok / "tokenizer.json")


@pytest.mark.parametrize("keep", [1000, 1 << 20])
def test_a_truncated_gguf_names_the_file(tmp_path, capsys, keep):
    from conftest import shared_path

    source = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    cut = tmp_path / "cut.gguf"
    with source.open("rb") as fh:
        cut.write_bytes(fh.read(keep))
    code = main(train_argv(tmp_path / "out", max_steps=1) + ["--init", str(cut)])
    assert_one_line_error(capsys, code, "train", cut)


def test_the_cli_prints_one_line_and_no_traceback(run_copy):
    """The same through a real process: stderr is the one error line (exit 2)."""
    truncate(run_copy / "checkpoints" / "step-000006" / "trainer_state.pt")
    proc = run_cli(train_argv(run_copy) + ["--resume"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("patchrec train: error: ") and "trainer_state.pt" in last
