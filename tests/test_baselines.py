"""ID baselines: packed models equal per-sequence computations, training windows equal the train samples,
popularity counts, a tiny run where the sequence models beat popularity, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import set_seed

from patchrec.baselines import GRU4Rec, GRU4RecConfig, Popularity, SASRec, SASRecConfig, TrainConfig
from patchrec.baselines.checkpoint import load_baseline
from patchrec.baselines.train import cu_seqlens_of, evaluate, fit, training_windows
from patchrec.data.dataset import Dataset, make_samples
from patchrec.data.source import load_data
from patchrec.data.synthetic import make_synthetic
from patchrec.eval.metrics import rank_samples, ranking_metrics

NUM_ITEMS = 37
LENGTHS = [1, 5, 17, 3, 12]  # odd sizes and a one-item sequence


def _packed_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, NUM_ITEMS, (n,), generator=gen) for n in LENGTHS]
    return seqs, torch.cat(seqs), cu_seqlens_of(np.array(LENGTHS))


def _sasrec_one_sequence(model: SASRec, seq: torch.Tensor) -> torch.Tensor:
    """SASRec on one unpadded sequence [n] with a plain causal mask (no varlen, no packing)."""
    n, d = len(seq), model.config.hidden
    h = model.config.num_heads
    x = model.item_emb(seq) * math.sqrt(d) + model.pos_emb(torch.arange(n))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for block in model.blocks:
        y = block.attn_norm(x)
        q, k, v = (
            p(y).view(n, h, d // h).transpose(0, 1) for p in (block.q_proj, block.k_proj, block.v_proj)
        )
        att = (q @ k.transpose(1, 2)) / math.sqrt(d // h)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + block.out_proj((att @ v).transpose(0, 1).reshape(n, d))
        x = x + block.ffn(block.ffn_norm(x))
    return model.logits(model.final_norm(x))


def test_packed_sasrec_equals_per_sequence_causal():
    set_seed(0)
    model = SASRec(
        NUM_ITEMS, SASRecConfig(hidden=24, num_heads=2, num_blocks=2, dropout=0.2, max_len=20)
    ).eval()
    seqs, items, cu = _packed_batch()
    with torch.no_grad():
        packed = model.logits(model(items, cu, max(LENGTHS)))
        expected = torch.cat([_sasrec_one_sequence(model, s) for s in seqs])
    assert packed.shape == (sum(LENGTHS), NUM_ITEMS)
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    # a sequence's outputs must not depend on its neighbours in the pack
    with torch.no_grad():
        alone = model.logits(model(seqs[2], cu_seqlens_of(np.array([LENGTHS[2]])), LENGTHS[2]))
    torch.testing.assert_close(alone, packed[cu[2] : cu[3]], rtol=1e-5, atol=1e-5)


def test_packed_gru4rec_equals_per_sequence_gru():
    set_seed(0)
    model = GRU4Rec(NUM_ITEMS, GRU4RecConfig(embedding=16, hidden=20, num_layers=2)).eval()
    seqs, items, cu = _packed_batch(1)
    with torch.no_grad():
        packed = model.logits(model(items, cu, max(LENGTHS)))
        expected = torch.cat([model.output(model.gru(model.item_emb(s)[None])[0][0]) for s in seqs])
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)


def test_sasrec_rejects_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        SASRec(NUM_ITEMS, SASRecConfig(hidden=10, num_heads=3))
    model = SASRec(NUM_ITEMS, SASRecConfig(hidden=8, max_len=4))
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens_of(np.array([5])), 5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(5, dtype=torch.long), cu_seqlens_of(np.array([3])), 3)


def _hand_dataset() -> Dataset:
    # user 0: 9 items, train 0..6; user 1: 4 items all train; user 2: 3 items (no samples); user 3: no train
    items = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 3, 2, 1, 0, 4, 4, 4, 5, 6], dtype=np.int32)
    ds = Dataset(
        name="hand",
        titles=[f"t{i}" for i in range(9)],
        items=items,
        user_offsets=np.array([0, 9, 13, 16, 18]),
        user_ids=np.arange(4),
        splits={
            "train": np.array([[0, 6], [0, 3], [0, 2], [-1, -1]]),
            "val": np.array([[7, 7], [-1, -1], [-1, -1], [0, 0]]),
            "test": np.array([[8, 8], [-1, -1], [-1, -1], [1, 1]]),
        },
        system_prompt="s",
        user_prompt="u [HISTORY_SEQUENCE]",
    )
    ds.check()
    return ds


@pytest.mark.parametrize("max_len", [1, 2, 3, 100])
def test_training_windows_cover_exactly_the_train_targets(max_len):
    ds = _hand_dataset()
    w = training_windows(ds, max_len)
    assert np.all(w.length >= 1) and np.all(w.length <= max_len)
    # window positions predict items[start + j + 1]; the weighted ones are exactly the train samples
    target_index = np.concatenate([s + 1 + np.arange(n) for s, n in zip(w.start, w.length, strict=True)])
    weighted = np.sort(target_index[w.weight])
    assert weighted.tolist() == np.sort(make_samples(ds, "train", max_len).target_index).tolist()
    assert len(set(weighted.tolist())) == len(weighted)  # each target once


def test_popularity_counts_the_train_split_only():
    ds = _hand_dataset()
    pop = Popularity.fit(ds)
    # train items: 0..6 (user 0), 3 2 1 0 (user 1), 4 4 4 (user 2)
    assert pop.counts.tolist() == [2, 2, 2, 2, 4, 1, 1, 0, 0]


@pytest.fixture(scope="module")
def topical():
    # one drifting topic at a time: the next item's topic is readable from the recent history, so a
    # sequence model must clearly beat item popularity (which ignores the user)
    return make_synthetic(
        num_users=400,
        num_items=200,
        mean_length=40,
        seed=0,
        num_topics=10,
        long_term_share=0.0,
        drift_length=30.0,
    )


@pytest.mark.slow
def test_sequence_models_beat_popularity(topical):
    torch.set_num_threads(1)
    test = make_samples(topical, "test", 50)
    pop_hr10 = ranking_metrics(rank_samples(Popularity.fit(topical).scorer(test), test), (10,))["HR@10"]
    config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, patience=4, seed=0)
    models = {
        "sasrec": lambda: SASRec(topical.num_items, SASRecConfig(hidden=32, dropout=0.1, max_len=50)),
        "gru4rec": lambda: GRU4Rec(topical.num_items, GRU4RecConfig(embedding=32, hidden=64, dropout=0.1)),
    }
    for name, make in models.items():
        set_seed(0)
        model = make()
        result = fit(model, topical, config, max_len=50, progress=False)
        assert result.best_epoch >= 1, name  # training improved on the untrained model
        hr10 = ranking_metrics(evaluate(model, test), (10,))["HR@10"]
        assert hr10 > pop_hr10 + 0.15, (name, hr10, pop_hr10)


def test_fit_is_reproducible(topical):
    torch.set_num_threads(1)
    config = TrainConfig(epochs=1, batch_size=128, seed=3)
    losses = []
    for _ in range(2):
        set_seed(3)
        model = GRU4Rec(topical.num_items, GRU4RecConfig(embedding=8, hidden=8))
        losses.append(fit(model, topical, config, max_len=20, progress=False).history[0])
    assert losses[0] == losses[1]


def test_cli_smoke(tmp_path):
    from patchrec.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "pop"
    assert (
        main(
            [
                "baseline",
                "popularity",
                "--data",
                "synthetic",
                "--both-masks",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["mask_history"] is False and res["model"] == "popularity" and res["split"] == "test"
    assert res["ks"] == [1, 5, 10, 20, 50] and len(res["ranks"]) == res["num_samples"] > 0
    masked = json.loads((out / "results_masked.json").read_text())
    assert masked["mask_history"] is True
    assert masked["metrics"]["HR@20"] >= res["metrics"]["HR@20"]  # masking only removes competitors
    assert json.loads((out / "config.json").read_text())["model"] == "popularity"

    out = tmp_path / "sasrec"
    argv = [
        "baseline",
        "sasrec",
        "--data",
        "synthetic",
        "--max-items",
        "20",
        "--epochs",
        "1",
        "--hidden",
        "16",
        "--mask-history",
        "--split",
        "val",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["mask_history"] is True and res["split"] == "val"
    assert res["config"]["model_config"]["hidden"] == 16 and res["config"]["model_config"]["max_len"] == 20
    assert (out / "model.safetensors").exists()
    # the saved directory loads back (safetensors + config.json, no pickle) and ranks exactly as the run did
    loaded, saved = load_baseline(out)
    val = make_samples(load_data("synthetic"), "val", saved["max_items"])
    assert evaluate(loaded, val, mask_history=True).tolist() == res["ranks"]

    # a flag that does not apply to the model is an error, not silently ignored
    assert main(["baseline", "popularity", "--data", "synthetic", "--epochs", "3", "--out", str(out)]) == 2


def test_cli_rejects_bad_max_items(tmp_path, capsys):
    from patchrec.cli import main

    assert (
        main(["baseline", "popularity", "--data", "synthetic", "--max-items", "0", "--out", str(tmp_path)])
        == 2
    )
    assert "--max-items" in capsys.readouterr().err


def test_models_give_distinct_scores_after_one_step():
    # guards the loss wiring: one optimiser step on a batch must change the logits
    set_seed(0)
    model = SASRec(NUM_ITEMS, SASRecConfig(hidden=8, max_len=20))
    _, items, cu = _packed_batch()
    before = model.eval().logits(model(items, cu, max(LENGTHS))).detach()
    model.train()
    loss = F.cross_entropy(model.logits(model(items, cu, max(LENGTHS))), torch.roll(items, -1))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = model.eval().logits(model(items, cu, max(LENGTHS))).detach()
    assert not torch.allclose(before, after)


def test_command_choices_are_the_library_models():
    """``patchrec baseline`` writes its choices out (its parser must not import torch); they are the models
    ``patchrec.baselines.run`` runs."""
    from patchrec.baselines.run import DEFAULT_LR, MODELS
    from patchrec.commands import baseline as command

    assert command.MODELS == MODELS and set(DEFAULT_LR) == set(MODELS) - {"popularity"}
