"""One training step of the real SmolLM2-135M-Instruct (the GGUF file in ../shared, dequantised to fp32) on
ML-100K at L = 50: full fine-tuning against LoRA r = 16, for the vanilla and PFT-I (k = 5) plans.

A step is what ``patchrec train`` does per optimizer step: pack the step's samples (timed), forward on the
packed path, backward, AdamW over the trainable parameters (``patchrec.train.parallel.param_groups``).
Modes: ``full`` (every weight); ``lora-r16`` (adapters on every q/k/v/o and MLP projection, alpha 32, plus the
embedding rows patchrec adds, ``--train-embeddings new``, the default: the table gets a dense gradient and
AdamW state); ``lora-r16-frozen-table`` (the same adapters, ``--train-embeddings none``). Same samples and
base weights in every mode.

``extra_info``: samples per second (samples / median step), trainable parameters, and the training memory of
the mode: the peak RSS of a FRESH process (this file run as a script, one per case, so that no other case's
freed memory is reused) during its first two steps, above its RSS once the model is loaded (so: gradients,
AdamW state, activations), sampled every millisecond (``machine.measure_peak``). The CPU is shared with other
work: the 1-minute load average before and after each case is recorded; compare the modes of one run
(measured side by side), never across runs. ``BATCH`` samples per step, one intra-op thread on CPU (see
``conftest``), 5 rounds after a warmup round.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from machine import DEVICE, HAS_CUDA, SHARED, device_name, measure_peak, measured_seconds, sync

MODEL = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "patchrec" / "ml-100k"
if not (MODEL.exists() and DATA.exists()):
    pytest.skip(f"{SHARED} (SmolLM2 GGUF, ML-100K release) not available", allow_module_level=True)
pytest.importorskip("peft")
pytest.importorskip("gguf")

from patchrec.batching.pack import pack_batch  # noqa: E402
from patchrec.batching.plan import make_planner  # noqa: E402
from patchrec.model.lora import LoraSettings, apply_lora  # noqa: E402
from patchrec.train.parallel import param_groups  # noqa: E402
from patchrec.train.stage_inputs import added_token_ids  # noqa: E402

L = 50
BATCH = int(os.environ.get("PATCHREC_BENCH_BATCH", 8 if HAS_CUDA else 2))
ROUNDS = 5
RANK = 16
PLANS = {"vanilla": dict(name="vanilla"), "pft-i": dict(name="pft-i", k=5)}
MODES = {"full": None, f"lora-r{RANK}": "new", f"lora-r{RANK}-frozen-table": "none"}  # mode -> embeddings


def load_setup():
    """(dataset, tokens, the SmolLM2 base with the marker rows, the ids of the rows patchrec adds)."""
    from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
    from patchrec.data.release import load_release
    from patchrec.model.decoder import PackedDecoder

    dataset = load_release(DATA)
    tokenizer = load_tokenizer(MODEL)
    tokens = tokenize_dataset(tokenizer, dataset)
    base = PackedDecoder.from_pretrained(MODEL, vocab_size=tokens.vocab_size, dtype=torch.float32)
    return dataset, tokens, base, added_token_ids(tokenizer, tokens)


def make_case(setup, plan: str, mode: str, *, copy_base: bool = True):
    """The mode's model and optimizer, and ``step()``: one optimizer step on BATCH fixed samples."""
    from patchrec.data.dataset import make_samples

    dataset, tokens, base, new_rows = setup
    samples = make_samples(dataset, "train", max_items=L)
    eligible = np.flatnonzero(samples.history_lengths >= L)
    ids = np.sort(np.random.default_rng(0).choice(eligible, size=BATCH, replace=False))
    plans = make_planner(**PLANS[plan]).plan_batch(samples.history_lengths[ids], width=L)
    model = copy.deepcopy(base) if copy_base else base
    if MODES[mode] is not None:
        settings = LoraSettings(RANK, 2.0 * RANK, train_embeddings=MODES[mode])
        apply_lora(model, settings, base={"path": str(MODEL)}, new_rows=new_rows)
    model = model.to(DEVICE).train()
    groups, names = param_groups(model, 0.0)
    optimizer = torch.optim.AdamW(groups, lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pack_batch(samples, ids, plans, tokens).to(DEVICE), validate=False).loss.backward()
        optimizer.step()
        sync()

    info = {"trainable_params": sum(p.numel() for g in groups for p in g["params"]),
            "trainable_tensors": len(names), "packed_rows": pack_batch(samples, ids, plans, tokens).num_rows}
    return step, info


def fresh_process_memory(plan: str, mode: str) -> dict:
    """Run this file as a script for one case (a fresh process) and read what it measured."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, plan, mode], env=env, capture_output=True, text=True,
                          timeout=1800, cwd=os.path.dirname(__file__))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup():
    return load_setup()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("plan", list(PLANS))
def test_lora_train_step(benchmark, setup, plan, mode):
    load_before = os.getloadavg()[0]
    step, info = make_case(setup, plan, mode)
    benchmark.group = f"lora_step_{plan}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = measured_seconds(benchmark)
    load_after = os.getloadavg()[0]
    memory = fresh_process_memory(plan, mode)
    benchmark.extra_info.update(
        mode=mode, plan=plan, L=L, samples=BATCH, samples_per_s=BATCH / median,
        min_s=measured_seconds(benchmark, "min"), median_s=median, **info, **memory,
        load_average_1min_before=load_before, load_average_1min_after=load_after, cores=os.cpu_count(),
        threads=torch.get_num_threads(), model=MODEL.name, dtype="float32", device=device_name(),
    )  # fmt: skip


if __name__ == "__main__":  # one case's training memory, in a process of its own (fresh_process_memory)
    torch.set_num_threads(1)
    case_plan, case_mode = sys.argv[1], sys.argv[2]
    case_step, _ = make_case(load_setup(), case_plan, case_mode, copy_base=False)
    # From the loaded model (weights, data, tokenizer) on: the first step allocates gradients and the AdamW
    # state, the second holds them while it runs.
    peak, method = measure_peak(lambda: (case_step(), case_step()))
    method = f"fresh process, two steps: {method}"
    print(json.dumps({"train_mem_bytes": int(peak), "train_mem_method": method}))
