"""The training step's fixed cost on CPU, cut without changing what is computed: the tied table's sparse patch
gradient (bitwise the dense one) and the AdamW implementations (foreach bitwise torch's per-tensor loop,
fused an explicit option that rounds differently)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.pack import pack_batch
from patchrec.batching.plan import pft_i_plan, pft_s_plan, stack_plans, vanilla_plan
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.cli import build_parser
from patchrec.commands.train import config_from_args
from patchrec.data.dataset import make_samples
from patchrec.model.decoder import PackedDecoder
from patchrec.train.config import TrainConfig
from patchrec.train.parallel import make_adamw, param_groups


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    ds = tiny_dataset(seed=3, num_users=6, max_len=30)
    td = tokenize_dataset(tok, ds)
    samples = make_samples(ds, "train", max_items=14)
    n = samples.history_lengths
    ids = np.sort(np.argsort(-n)[:3])
    plans = [vanilla_plan(int(n[ids[0]])), pft_i_plan(int(n[ids[1]]), 3), pft_s_plan(int(n[ids[2]]), 3)]
    batch = pack_batch(samples, ids, (stack_plans(plans),), td)
    return td, batch


def make_model(vocab: int, **overrides) -> PackedDecoder:
    model = PackedDecoder.from_preset("tiny", vocab, seed=1, **overrides)
    # Spread the table so that every row's gradient differs from its neighbours' (no lucky ties).
    with torch.no_grad():
        model.embedding_table().normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return model


def table_grad(model: PackedDecoder, batches, *, sparse: bool, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(PackedDecoder, "sparse_table_grad", lambda self: sparse)
        model.zero_grad(set_to_none=True)
        for batch in batches:  # several micro-batches accumulate into .grad, as the training loop does
            model(batch).loss.backward()
    return model.embedding_table().grad


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "ops,threads,pad",
    [("reference", 1, False), ("reference", 1, True), ("reference", 2, True), ("interpreter", 1, True)],
    indirect=["threads"],
)
def test_sparse_table_gradient_is_the_dense_one(setup, ops, pad, threads, monkeypatch, request):
    """Bitwise at one intra-op thread. With several, torch's parallel index accumulation (the reference's
    backward) splits a [U, D] target differently from a [V, D] one, so the row sums may round differently
    (as they already do between thread counts): equal to fp32 rounding."""
    if ops == "reference":
        request.getfixturevalue("reference_ops")
    td, batch = setup
    pad = int(batch.token_ids.mode().values) if pad else None  # a padding row the batch reads
    model = make_model(td.vocab_size, pad_token_id=pad)
    assert model.sparse_table_grad()  # tied, CPU, grad enabled: the default path of a CPU training step
    assert model.lm.get_input_embeddings().padding_idx == pad
    other = copy.deepcopy(model)
    dense = table_grad(model, [batch, batch], sparse=False, monkeypatch=monkeypatch)
    sparse = table_grad(other, [batch, batch], sparse=True, monkeypatch=monkeypatch)
    assert sparse.layout == torch.strided and dense.abs().sum() > 0
    # Several threads: rounding of sums whose terms are much larger than the result.
    def same(a, b):
        if threads == 1:
            return torch.equal(a, b)
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max())

    assert same(sparse, dense)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert same(a.grad, b.grad), name
    if pad is not None:  # the padding row gets the head's gradient only, as nn.Embedding(padding_idx) does
        head_only = copy.deepcopy(model)
        head_only.zero_grad(set_to_none=True)
        with torch.no_grad():
            hidden = head_only.hidden_states(batch).index_select(0, batch.label_rows)
        torch.nn.functional.cross_entropy(head_only.logits(hidden), batch.label_ids).backward()
        torch.testing.assert_close(sparse[pad], 2 * head_only.embedding_table().grad[pad], rtol=1e-6, atol=0)


def test_sparse_table_gradient_only_where_it_is_exact(setup):
    td, batch = setup
    tied = make_model(td.vocab_size)
    untied = make_model(td.vocab_size, tie_word_embeddings=False)
    assert tied.sparse_table_grad() and not untied.sparse_table_grad()
    with torch.no_grad():
        assert not tied.sparse_table_grad()
    tied.embedding_table().requires_grad_(False)
    assert not tied.sparse_table_grad()
    untied(batch).loss.backward()  # the untied table still gets its dense gradient
    assert untied.embedding_table().grad.layout == torch.strided


def run_steps(setup, impl: str | None, steps: int = 3) -> PackedDecoder:
    td, batch = setup
    model = make_model(td.vocab_size)
    groups, _ = param_groups(model, 0.1)
    if impl is None:  # torch's own choice on CPU: the per-tensor loop
        optimizer = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    else:
        optimizer = make_adamw(groups, lr=1e-2, impl=impl)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(batch).loss.backward()
        optimizer.step()
    return model


def test_adamw_foreach_is_bitwise_the_per_tensor_loop_and_fused_is_close(setup, reference_ops_one_thread):
    loop = run_steps(setup, None)
    foreach = run_steps(setup, "foreach")
    fused = run_steps(setup, "fused")
    changed = False
    pairs = zip(loop.named_parameters(), foreach.parameters(), fused.parameters(), strict=True)
    for (name, a), b, c in pairs:
        assert torch.equal(a, b), name
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)  # 1e-5: a thousandth of one step (lr)
        changed |= not torch.equal(a, c)
    assert changed  # fused really is another implementation (it rounds differently)


def test_adamw_option_in_config_and_cli(tmp_path):
    assert TrainConfig().adamw == "foreach"
    with pytest.raises(ValueError, match="adamw"):
        TrainConfig(adamw="sgd")
    with pytest.raises(ValueError, match="adamw"):
        make_adamw([{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=1.0, impl="lion")
    argv = ["train", "--stage", "vanilla", "--data", "synthetic", "--out", str(tmp_path), "--adamw", "fused"]
    args = build_parser().parse_args(argv)
    assert config_from_args(args).adamw == "fused"
