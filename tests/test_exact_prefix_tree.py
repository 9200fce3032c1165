"""Exact ranking with shared title prefixes (``patchrec.eval.exact.PrefixTree``): one row per distinct
prefix gives the scores of one causal sequence per title and of one plain transformers forward per
(prompt, title)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_evaluate import reference_title_scores
from tiny_data import build_tiny_tokenizer, tiny_dataset

from patchrec.batching.pack import iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import TitleTable, load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.eval.exact import CatalogTitles, PrefixTree, score_titles
from patchrec.model.decoder import PackedDecoder

# Titles sharing token prefixes at several depths, one a prefix of another, one with no sibling.
TITLES = ["Star Wars", "Star Wars Return", "Star Trek", "Heat", "Heathers", "The Game", "The Gift",
          "The Game Night", "Babe", "Alien", "Aliens", "Toy Story", "Toy Story Two"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    ds = tiny_dataset(seed=2, num_users=8, max_len=20)
    titles = [TITLES[i % len(TITLES)] + ("" if i < len(TITLES) else f" {i}") for i in range(ds.num_items)]
    ds = dataclasses.replace(ds, titles=titles)
    td = tokenize_dataset(tok, ds)
    samples = make_samples(ds, "train", max_items=10)
    model = PackedDecoder.from_preset("tiny", td.vocab_size, seed=6).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tok, td, samples, model
    torch.set_num_threads(threads)


def catalog_of(titles: list[list[int]]) -> CatalogTitles:
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in titles])]).astype(np.int64)
    return CatalogTitles.from_table(TitleTable(offsets, np.array([x for t in titles for x in t], np.int32)))


def test_tree_has_one_node_per_distinct_prefix():
    titles = [[5, 6, 7], [5, 6], [5, 8], [9], [5, 6, 7, 1], [9, 2]]
    tree = PrefixTree.from_catalog(catalog_of(titles), eot=0)
    prefixes = {tuple(t[:j]) for t in titles for j in range(1, len(t) + 1)}
    assert len(tree) == len(prefixes) == 7 < sum(map(len, titles))
    # Every node's path spells its prefix; subtrees of first tokens are contiguous and cover all nodes.
    spelled = set()
    for n in range(len(tree)):
        path = tree.path[tree.path_offsets[n] : tree.path_offsets[n + 1]]
        assert len(path) == tree.depth[n] and path[-1] == n
        spelled.add(tuple(tree.tokens[path].tolist()))
    assert spelled == prefixes
    assert tree.roots[0] == 0 and tree.roots[-1] == len(tree) and (np.diff(tree.roots) > 0).all()
    for a, b in zip(tree.roots[:-1], tree.roots[1:], strict=True):
        assert (tree.depth[a] == 1) and (tree.depth[a + 1 : b] > 1).all()
    # The terms along each title read its next tokens and then eot, at the nodes of its own path.
    for u, title in enumerate(titles):
        pairs = tree.title_pairs[tree.title_pairs_offsets[u] : tree.title_pairs_offsets[u + 1]]
        assert tree.pair_label[pairs].tolist() == title[1:] + [0]
        assert tree.tokens[tree.pair_node[pairs]].tolist() == title
    terms = set(zip(tree.pair_node.tolist(), tree.pair_label.tolist(), strict=True))
    assert len(terms) == len(tree.pair_node)  # each (node, label) term once
    assert [tuple(c) for c in tree.chunks(3)] == [(0, 5), (5, 7)]  # whole subtrees, a big one alone
    with pytest.raises(ValueError, match="eot"):
        PrefixTree.from_catalog(catalog_of(titles), eot=7)


@pytest.mark.parametrize("plan", ["vanilla", "pft-s"])
def test_shared_prefix_scores_equal_one_sequence_per_title(setup, plan):
    tok, td, samples, model = setup
    catalog = CatalogTitles.from_table(td.titles)
    tree = catalog.prefix_tree(td.prompt.eot)
    assert tree is catalog.prefix_tree(td.prompt.eot)  # built once per catalog
    assert len(tree) < catalog.lengths.sum()  # prefixes really are shared
    planner = make_planner(plan, k=2, g=2)
    ids = np.argsort(-samples.history_lengths, kind="stable")[:3]
    with torch.no_grad():
        batch = next(iter_batches(samples, planner, td, max_rows=1000, order=ids, answer=False))
        assert batch.num_sequences == 3
        flat = score_titles(model, batch, catalog, td.prompt.eot, max_rows=10_000, shared_prefixes=False)
        for max_rows in (30, 10_000):  # many chunks of whole subtrees, and one
            shared = score_titles(model, batch, catalog, td.prompt.eot, max_rows=max_rows,
                                  shared_prefixes=True)  # fmt: skip
            torch.testing.assert_close(shared, flat, rtol=1e-5, atol=1e-5)
    order = [int(s) for s in batch.sample_ids]
    ref = reference_title_scores(tok, model, samples, order, planner, catalog, td.prompt.eot)
    torch.testing.assert_close(shared.double(), ref, rtol=1e-4, atol=1e-4)
    assert ref.std(dim=1).min() > 1e-3
