"""``torch.compile(PackedDecoder, fullgraph=True)`` (aot_eager, dynamic shapes): compiled equals eager, loss
and gradients, for vanilla, PFT-I, PFT-S and PerSRec batches, in one graph per step, and a batch of another
shape or plan reuses the compiled graphs.
For the PFT plans the Triton kernel runs inside its custom op (on CPU in the interpreter: the path that
used to fail with "RuntimeError when making fake tensor call"; on a GPU compiled, with a fused attention
backend in bf16); the PerSRec test runs the references, as CPU training does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.model.decoder import PackedDecoder

SEGMENT, TOKENS = 3, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    ds = tiny_dataset(seed=5, num_users=9, max_len=20)
    td = tokenize_dataset(tok, ds, persrec_tokens=TOKENS)
    samples = make_samples(ds, "train", max_items=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield td, samples
    torch.set_num_threads(threads)


def _batch(setup, plan, ids):
    td, samples = setup
    options = dict(segment=SEGMENT, tokens=TOKENS) if plan == "persrec" else dict(k=3, g=3)
    (batch,) = iter_batches(samples, make_planner(plan, **options), td, max_rows=10**6, order=np.array(ids))
    return batch


def _step(model, call, batch):
    """Loss per label and the gradients of two parameters (the tied embedding table and a projection)."""
    model.zero_grad(set_to_none=True)
    out = call(batch, validate=False)
    out.loss.backward()
    emb = model.lm.get_input_embeddings().weight
    q_proj = model.lm.model.layers[0].self_attn.q_proj.weight
    return out.label_loss.detach(), emb.grad.clone(), q_proj.grad.clone()


def _check_compiled_steps(model, batches, device="cpu", tol=(1e-5, 1e-6)):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True, fullgraph=True)  # one graph per step
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        # The first batch compiles; every later one (other shapes, other plans) must reuse its graphs.
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got = _step(model, compiled, batch)
        want = _step(model, model, batch)
        for name, g, w in zip(("label_loss", "embedding grad", "q_proj grad"), got, want, strict=True):
            assert w.abs().sum() > 0, name
            torch.testing.assert_close(g, w, rtol=tol[0], atol=tol[1], msg=lambda m, n=name: f"{n}: {m}")


def _pft_batches(setup):
    # PFT-S first: its sizes are all distinct (tokens > segments > rows), so dynamic shapes keep them
    # apart; a vanilla batch has T == S == R and a PFT-I one S == R, which the first compile would otherwise
    # fold into one size (duck sizing) and the next plan would recompile.
    batches = [
        _batch(setup, "pft-s", [6, 7]),  # samples with 8 history items: sessions with remainders
        _batch(setup, "pft-i", [5, 12]),
        _batch(setup, "vanilla", [11, 10]),
    ]
    rows, tokens = [b.num_rows for b in batches], [b.token_ids.numel() for b in batches]
    assert len(set(rows)) == 3 and len(set(tokens)) == 3, "the batches must differ in shape"
    assert rows[0] < tokens[0] and rows[1] < tokens[1], "PFT-S and PFT-I batches must compress"
    pft_s = batches[0]
    assert pft_s.num_rows + 1 < pft_s.seg_offsets.numel() < pft_s.token_ids.numel() + 1, "PFT-S has sessions"
    return batches


def test_compiled_model_equals_eager_for_vanilla_pft_i_and_pft_s_without_recompiling(setup):
    td, _ = setup
    model = PackedDecoder.from_preset("tiny", td.vocab_size, seed=3, num_hidden_layers=1)
    _check_compiled_steps(model, _pft_batches(setup))


def test_compiled_model_equals_eager_for_persrec_without_recompiling(setup, reference_ops):
    """With the references, as CPU training runs them: the reference patch_embed is traced into the graph."""
    td, _ = setup
    model = PackedDecoder.from_preset("tiny", td.vocab_size, seed=4, num_hidden_layers=1)
    batches = [_batch(setup, "persrec", [0, 3, 5]), _batch(setup, "persrec", [1, 4, 6, 7])]
    assert all(b.layout is not None for b in batches)
    assert batches[0].layout.max_k != batches[1].layout.max_k
    _check_compiled_steps(model, batches)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_model_equals_eager(setup, dtype):
    td, _ = setup
    model = PackedDecoder.from_preset("tiny", td.vocab_size, seed=3, num_hidden_layers=1).to("cuda", dtype)
    tol = (1e-4, 1e-5) if dtype == torch.float32 else (3e-2, 3e-2)
    _check_compiled_steps(model, _pft_batches(setup), device="cuda", tol=tol)
