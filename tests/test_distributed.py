"""Data-parallel training and evaluation on torch.distributed: 2 CPU processes (gloo) launched by torchrun
from the test, against the single-process run of the same global batch.

What must hold whatever the world size: the samples and random plans of every step, the per-step losses (up
to fp32 reduction order), the checkpoint (resumable on another world size and mode) and the evaluation ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.model.decoder import PackedLlama
from patchrec.train.checkpoint import latest_checkpoint
from patchrec.train.config import preset
from patchrec.train.distributed import balanced_bounds, even_bounds, greedy_bounds, shard_step
from patchrec.train.loop import step_micro_batches, step_samples, total_steps_of, train
from patchrec.train.parallel import _by_index, _by_name, param_groups
from patchrec.train.stage_inputs import load_dataset

# tests/test_train.py's small synthetic problem; 15 training samples in steps of 7 make the third step a
# single sample, so one of two ranks has nothing to do there (it must still join the collectives).
SMALL = dict(data="synthetic", synthetic_users=40, synthetic_items=60, synthetic_length=16.0,
             synthetic_topics=6, tokenizer_vocab=300, max_items=12, max_rows=1600, progress=False)
RUN = dict(stage="pretrain", train_samples=15, batch_size=7, max_steps=4, save_every=2, log_every=1,
           val_every=4, val_samples=6)
# fp32 sums in another order (micro-batches per rank, then the all-reduce): 1e-5 relative is generous.
RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("reference_ops_one_thread")


def config_of(out: Path, **overrides):
    return preset("tiny", **(SMALL | RUN | {"out": str(out)} | overrides))


def cli_flags(values: dict) -> list[str]:
    flags = []
    for name, value in values.items():
        if name == "progress":
            flags += [] if value else ["--no-progress"]
        else:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def torchrun(
    args: list[str], cwd: Path, nproc: int = 2, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N`` (a free port of its own), one thread per process; ``env``
    adds variables."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"} | (env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_ok(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    proc = torchrun(args, cwd, **kwargs)
    tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{tail}"
    return proc


def logged_losses(out: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    steps = [ln["step"] for ln in lines if "loss" in ln]
    assert steps == sorted(set(steps)), steps  # one line per step: only rank 0 logs
    return {ln["step"]: ln["loss"] for ln in lines if "loss" in ln}


def logged_validation(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines() if "HR@10" in ln]


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    a = np.array([got[s] for s in steps])
    b = np.array([want[s] for s in steps])
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)


def resumable_copy(run: Path, step: int, dest: Path) -> Path:
    """A run directory whose newest checkpoint is ``run``'s step ``step`` (as if it had stopped there)."""
    dest.mkdir(parents=True)
    for name in ("train_config.json", "log.jsonl", "tokenizer"):
        src = run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    (dest / "checkpoints").mkdir()
    ckpt = f"step-{step:06d}"
    shutil.copytree(run / "checkpoints" / ckpt, dest / "checkpoints" / ckpt)
    (dest / "checkpoints" / "latest").write_text(ckpt + "\n")
    return dest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("dist") / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        result = train(config_of(out))
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert sorted(result.step_losses) == [1, 2, 3, 4]
    return out, result.step_losses


# ---- partitions and step shards (one process) --------------------------------------------------------------
def test_balanced_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        costs = rng.integers(1, 500, rng.integers(0, 40))
        parts = int(rng.integers(1, 9))
        b = balanced_bounds(costs, parts)
        assert b[0] == 0 and b[-1] == len(costs) and len(b) == parts + 1 and np.all(np.diff(b) >= 0)
        sums = np.array([costs[b[k] : b[k + 1]].sum() for k in range(parts)])
        if len(costs):
            assert sums.max() <= costs.sum() / parts + costs.max()  # within one item of the ideal share
    assert balanced_bounds(np.array([100, 1, 1, 1]), 2).tolist() == [0, 1, 4]  # rows, not counts
    assert balanced_bounds(np.array([5]), 3).tolist() == [0, 0, 1, 1]  # an empty share
    assert balanced_bounds(np.array([], dtype=np.int64), 2).tolist() == [0, 0, 0]
    assert even_bounds(7, 3).tolist() == [0, 2, 4, 7]
    assert greedy_bounds(np.array([3, 3, 3, 5]), 6).tolist() == [0, 2, 3, 4]
    with pytest.raises(ValueError, match="budget"):
        greedy_bounds(np.array([3, 7]), 6)


@pytest.fixture(scope="module")
def small_tokens(tmp_path_factory):
    config = config_of(tmp_path_factory.mktemp("tok"))
    from patchrec.batching.tokenizer_train import train_title_tokenizer

    dataset = load_dataset(config)
    tok_dir = tmp_path_factory.mktemp("bpe")
    train_title_tokenizer(dataset.titles, tok_dir, config.tokenizer_vocab,
                          extra_texts=[dataset.system_prompt, dataset.user_prompt])  # fmt: skip
    return config, dataset, tokenize_dataset(load_tokenizer(tok_dir), dataset, persrec_tokens=2)


def _batches_equal(a, b) -> bool:
    def same(x, y) -> bool:
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if hasattr(x, "__dataclass_fields__"):  # a persrec batch's BlockLayout
            return all(same(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
        return x == y  # ints; None for the optional persrec fields

    return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)


@pytest.mark.parametrize("plan", ["vanilla", "pft-s", "pretrain", "dropout", "persrec"])
def test_shards_split_the_single_process_step(small_tokens, plan):
    """One rank's shard IS the single-process step (same batches, bit for bit); with several ranks the
    sequences (samples, views, random plans) are the same, split disjointly and in order."""
    config, dataset, tokens = small_tokens
    samples = make_samples(dataset, "train", config.max_items)
    config = config.replace(train_samples=0, max_steps=0, epochs=1, batch_size=9)
    planner = make_planner(plan, k=3, g=3, segment=3, tokens=2)
    total = total_steps_of(config, len(samples))
    for step in (0, 3, total - 1):
        single = step_micro_batches(config, samples, planner, tokens, step, total)
        ids, seed = step_samples(config, len(samples), step)
        kwargs = dict(seed=seed, progress=step / total, max_rows=config.max_rows)
        one = shard_step(samples, planner, tokens, ids, rank=0, world_size=1, equal_counts=False, **kwargs)
        assert len(one.batches) == len(single) and all(map(_batches_equal, one.batches, single))
        assert one.num_labels == sum(int(b.label_ids.numel()) for b in single)
        assert one.rows == sum(b.num_rows for b in single) and one.weights == [1.0] * len(single)

        def per_seq(batches):  # (sample, view, rows, history tokens after compression) of each sequence
            return [(int(s), int(v), int(n), int(h)) for b in batches for s, v, n, h in zip(
                b.sample_ids, b.view_ids, torch.diff(b.cu_seqlens), b.hist_tokens_after, strict=True)]

        for world in (2, 3):
            for equal in (False, True):
                shards = [shard_step(samples, planner, tokens, ids, rank=r, world_size=world,
                                     equal_counts=equal, **kwargs) for r in range(world)]  # fmt: skip
                real = [[b for b, w in zip(s.batches, s.weights, strict=True) if w == 1.0] for s in shards]
                assert sum(map(per_seq, real), []) == per_seq(single)
                assert all(s.num_labels == one.num_labels and s.rows == one.rows for s in shards)
                assert [sum(b.num_rows for b in r) for r in real] == shards[0].rank_rows
                assert all(b.num_rows <= config.max_rows for s in shards for b in s.batches)
                counts = [len(s.batches) for s in shards]
                assert counts == [max(counts)] * world if equal else min(counts) >= 1


def test_rolling_layout_shard_budgets_fold_rows_like_the_single_process_step(small_tokens):
    """The rolling layout's fold-pass rows count toward ``max_rows`` in a rank's shard as in the
    single-process step (one budget rule: ``Slots.sample_rows``), so one rank's shard is that step, bit for
    bit, with a budget tight enough to cut the step into several micro-batches."""
    config, dataset, tokens = small_tokens
    samples = make_samples(dataset, "train", config.max_items)
    config = config.replace(train_samples=0, max_steps=0, epochs=1, batch_size=9, max_rows=500)
    planner = make_planner("persrec", segment=3, tokens=2, layout="rolling")
    total = total_steps_of(config, len(samples))
    for step in (0, total - 1):
        single = step_micro_batches(config, samples, planner, tokens, step, total)
        ids, seed = step_samples(config, len(samples), step)
        one = shard_step(samples, planner, tokens, ids, seed=seed, progress=step / total,
                         max_rows=config.max_rows, rank=0, world_size=1, equal_counts=False)  # fmt: skip
        assert any(b.folds for b in single) and len(single) > 1
        assert len(one.batches) == len(single) and all(map(_same, one.batches, single))


def _same(x, y) -> bool:
    """Equal tensors, dataclasses (a batch, its layout, its fold passes) and lists of them."""
    if torch.is_tensor(x):
        return torch.equal(x, y)
    if isinstance(x, list):
        return isinstance(y, list) and len(x) == len(y) and all(map(_same, x, y))
    if hasattr(x, "__dataclass_fields__"):
        return all(_same(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
    return x == y


def test_a_rank_without_samples_gets_a_zero_weighted_filler(small_tokens):
    config, dataset, tokens = small_tokens
    samples = make_samples(dataset, "train", config.max_items)
    planner = make_planner("pretrain")
    shards = [shard_step(samples, planner, tokens, np.array([5]), seed=1, progress=0.5, max_rows=1600, rank=r,
                         world_size=2, equal_counts=False) for r in range(2)]  # fmt: skip
    assert shards[0].weights == [1.0] and shards[1].weights == [0.0]
    assert _batches_equal(shards[0].batches[0], shards[1].batches[0]) and shards[1].rank_rows[1] == 0
    assert shards[0].num_labels == shards[1].num_labels == int(shards[0].batches[0].label_ids.numel())
    with pytest.raises(ValueError, match="max_rows"):
        shard_step(samples, planner, tokens, np.array([5]), seed=1, progress=0.5, max_rows=10, rank=0,
                   world_size=2, equal_counts=False)  # fmt: skip


def test_optimizer_state_by_name_round_trip():
    model = PackedLlama.from_preset("tiny", 50, seed=0)
    groups, names = param_groups(model, 0.1)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model(_fake_batch()).label_loss.sum().backward()
    opt.step()
    state = opt.state_dict()
    back = _by_index(_by_name(state, names), names)
    assert back["param_groups"] == state["param_groups"] and back["state"].keys() == state["state"].keys()
    assert [n for n, p in model.named_parameters() if p.ndim < 2] == names[-len(groups[1]["params"]):]


def _fake_batch():
    from patchrec.batching.pack import PackedBatch

    n = 7
    return PackedBatch(
        token_ids=torch.arange(n, dtype=torch.int32), seg_offsets=torch.arange(n + 1),
        row_offsets=torch.arange(n + 1), cu_seqlens=torch.tensor([0, 3, n], dtype=torch.int32),
        position_ids=torch.tensor([0, 1, 2, 0, 1, 2, 3]), max_seqlen=4, label_rows=torch.tensor([1, 2, 5, 6]),
        label_ids=torch.tensor([4, 5, 6, 7]), label_sample=torch.tensor([0, 0, 1, 1]),
        sample_ids=torch.tensor([0, 1]), view_ids=torch.zeros(2, dtype=torch.long),
        hist_tokens_before=torch.zeros(2, dtype=torch.long),
        hist_tokens_after=torch.zeros(2, dtype=torch.long),
    )  # fmt: skip


# ---- 2 processes under torchrun ----------------------------------------------------------------------------
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_reproduce_one_rank_and_resume_on_one(reference, tmp_path, parallel):
    """Same global batch on 2 ranks: the single-process losses; its step-2 checkpoint (full model + full
    optimizer state, written once) resumes in ONE process and reproduces the uninterrupted run."""
    ref_out, ref_losses = reference
    out = tmp_path / parallel
    argv = ["-m", "patchrec", "train", *cli_flags(SMALL | RUN), "--preset", "tiny", "--out", str(out),
            "--parallel", parallel, "--dist-timeout", "120"]  # fmt: skip
    proc = run_ok(argv, cwd=Path(__file__).parents[1])
    assert "finished at step 4/4 on 2 ranks" in proc.stdout and proc.stdout.count("finished at step") == 1
    losses = logged_losses(out)
    assert_losses_close(losses, ref_losses, range(1, 5))
    # validation ranks a shard per rank (FSDP: on a gathered full copy of the weights)
    assert logged_validation(out) == logged_validation(ref_out) and len(logged_validation(out)) == 1
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state == {"step": 4, "world_size": 2, "parallel": parallel}
    a, b = PackedLlama.from_pretrained(ref_out / "model"), PackedLlama.from_pretrained(out / "model")
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)

    resumed = train(config_of(resumable_copy(out, 2, tmp_path / "resumed")), resume=True)
    assert sorted(resumed.step_losses) == [3, 4]
    assert_losses_close(resumed.step_losses, ref_losses, [3, 4])
    assert_losses_close(resumed.step_losses, losses, [3, 4])


def test_fsdp_resumes_a_one_process_checkpoint(reference, tmp_path):
    """World size 1 -> 2 (and plain -> FSDP): the checkpoint's full optimizer state is sharded on load."""
    ref_out, ref_losses = reference
    out = resumable_copy(ref_out, 2, tmp_path / "grow")
    argv = ["-m", "patchrec", "train", *cli_flags(SMALL | RUN), "--preset", "tiny", "--out", str(out),
            "--parallel", "fsdp", "--resume"]  # fmt: skip
    run_ok(argv, cwd=Path(__file__).parents[1])
    assert_losses_close(logged_losses(out), ref_losses, [3, 4])


def test_lora_on_two_ranks_reproduces_one_rank(tmp_path):
    """DDP with LoRA (adapters and the markers' embedding rows trainable, everything else frozen): the 2-rank
    losses, adapters and embedding rows are the single-process run's."""
    from safetensors.torch import load_file

    lora = RUN | {"max_steps": 3, "save_every": 0, "val_every": 0, "lora_r": 4, "train_embeddings": "new",
                  "save": "adapter"}  # fmt: skip
    one = train(config_of(tmp_path / "one", **lora))
    out = tmp_path / "two"
    argv = ["-m", "patchrec", "train", *cli_flags(SMALL | lora), "--preset", "tiny", "--out", str(out),
            "--dist-timeout", "120"]  # fmt: skip
    proc = run_ok(argv, cwd=Path(__file__).parents[1])
    assert "finished at step 3/3 on 2 ranks" in proc.stdout
    assert_losses_close(logged_losses(out), one.step_losses, [1, 2, 3])
    for name in ("adapter_model.safetensors", "embeddings.safetensors"):
        a, b = load_file(str(one.model_dir / name)), load_file(str(out / "model" / name))
        assert sorted(a) == sorted(b) and len(a) > 1
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_sharded_eval_equals_single_process_eval(reference, tmp_path):
    from patchrec.cli import main

    ref_out, _ = reference
    argv = ["eval", "--model", str(ref_out), "--data", "synthetic", "--split", "test", "--limit", "9",
            "--mask-history", "--max-rows", "1600", "--no-progress"]  # fmt: skip
    assert main(argv + ["--out", str(tmp_path / "one.json")]) == 0
    run_ok(["-m", "patchrec", *argv, "--out", str(tmp_path / "two.json")], cwd=Path(__file__).parents[1])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["config"]["world_size"] == 2 and len(two["ranks"]) == 9
    assert two["ranks"] == one["ranks"] and two["metrics"] == one["metrics"]


def test_a_failing_rank_stops_the_job(tmp_path):
    """One rank raises while the other waits in a collective: the job ends with that error, not a hang."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        from patchrec.train.distributed import distributed

        with distributed(60, "cpu") as ctx:
            if ctx.rank == 1:
                raise RuntimeError("rank 1 failed on purpose")
            ctx.barrier()
    """))
    start = time.perf_counter()
    proc = torchrun([str(script)], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "rank 1 failed on purpose" in proc.stderr
    assert time.perf_counter() - start < 60  # well before the 60 s collective timeout
