"""``patchrec reproduce``: the paper's comparison on one backbone (METHOD.md §3, §5).

Rows, every LLM trained with the same samples per optimizer step and the same number of steps per stage:
- ``zero-shot``: the backbone as it is (vanilla prompt), what pre-trained weights alone know;
- ``vanilla``: SFT on all-text histories (one stage);
- ``pft-i`` / ``pft-s``: patch pre-training (stage 1, shared) then PFT-I or PFT-S (stage 2);
- ``popularity``, ``sasrec``, ``gru4rec``: ID baselines on the same test samples and history length.
Each LLM row is ranked with the authors' beam protocol (and exactly where the scale affords it).

Output directory::

    reproduce_config.json   the scale and paths of the run (checked on --resume)
    stages/<stage>/         patchrec train runs (model/, checkpoints/, log.jsonl, stage.json); a .gitignore
                            keeps the weights out of version control
    eval/<row>-<ranking>.json   patchrec.eval.metrics results files (raw ranks included)
    baselines/<name>.json   the ID baselines' results files
    summary.json, summary.md, summary.png

Everything is resumable: a finished stage or evaluation is skipped, an interrupted stage continues from its
newest checkpoint (``patchrec train --resume`` semantics, the same losses as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchrec.train.config import PRESETS as TRAIN_PRESETS

LLM_ROWS = ("zero-shot", "vanilla", "pft-i", "pft-s")
BASELINES = ("popularity", "sasrec", "gru4rec")
# row -> (training stages in order, the plan it is evaluated with)
ROW_STAGES = {"zero-shot": ((), "vanilla"), "vanilla": (("vanilla",), "vanilla"),
              "pft-i": (("pretrain", "pft-i"), "pft-i"), "pft-s": (("pretrain", "pft-s"), "pft-s")}
STAGE_INIT = {"vanilla": None, "pretrain": None, "pft-i": "pretrain", "pft-s": "pretrain"}  # None: backbone


@dataclass(frozen=True)
class Scale:
    """How much of the paper's protocol a run affords."""

    max_items: int  # history length L
    batch_size: int  # samples per optimizer step, every stage
    train_samples: int  # seeded subset of the training split per stage (0 = all: one epoch)
    test_samples: int  # seeded subset of the test split (0 = all)
    lr: float | None  # peak learning rate of every stage (None: the dataset's released rates)
    k: int  # PFT-I: newest items as text
    g: int | None  # PFT-S session size (None: the dataset's released G)
    exact: bool  # also rank the whole catalog exactly (cost: every title scored per sample)
    max_rows: int  # micro-batch budget (memory only)
    baseline_minutes: float  # training budget of each neural ID baseline (0 = until early stopping)
    why: str  # what the scale is for
    baseline_epochs: int = 200  # upper bound of the ID baselines' epochs (early stopping usually ends sooner)


SCALES: dict[str, Scale] = {
    "paper": Scale(max_items=100, batch_size=0, train_samples=0, test_samples=0, lr=None, k=5, g=None,
                   exact=True, max_rows=16384, baseline_minutes=0.0,
                   why="METHOD.md §3 settings: L=100, the released batch, one epoch per stage, the released "
                       "learning rates and G, every test sample; a GPU job"),
    # 2-core CPU, SmolLM2-135M (~120 packed rows/s training, ~1 s per sample of beam search at L=20).
    "cpu": Scale(max_items=20, batch_size=16, train_samples=480, test_samples=200, lr=1e-4, k=5, g=5,
                 exact=False, max_rows=4096, baseline_minutes=4.0,
                 why="a subset that finishes in about an hour on a 2-core CPU: L=20 (rows per sample ~5x "
                     "fewer than L=100), 30 steps of 16 samples per stage, G=5 (G=20 would leave an L=20 "
                     "history all text), lr 1e-4 (30 steps at the released 1e-5 barely move the weights), "
                     "200 seeded test samples, beam only (exact ranking scores 1,682 titles per sample: "
                     "~30 s each here)"),
}


def released(dataset_name: str, stage: str) -> dict[str, Any]:
    """The released hyper-parameters of a dataset (``patchrec.train.config.PRESETS``), MovieLens defaults."""
    key = dataset_name if dataset_name in TRAIN_PRESETS else "ml-1m"
    if key == "ml-100k" and stage == "pft-s":
        key = "ml-100k-pft-s"
    values = TRAIN_PRESETS[key]
    return {name: values[name] for name in ("lr", "g", "batch_size", "weight_decay", "warmup_ratio",
                                             "grad_clip")}  # fmt: skip


@dataclass
class RowResult:
    name: str
    metrics: dict[str, float]  # HR@10, HR@20, NDCG@10, NDCG@20 (beam protocol for LLM rows)
    ranking: str
    cr_measured: float | None = None  # mean over the evaluated samples of history tokens before / after
    cr_nominal: float | None = None  # a full L-item history with the catalog's mean title length
    train_rows_per_s: float | None = None
    train_seconds: float | None = None  # all stages of the row (PFT rows: the shared pre-training included)
    last_stage_seconds: float | None = None  # the row's own fine-tuning stage (vanilla / PFT-I / PFT-S)
    samples_trained: int | None = None  # per stage
    steps: int | None = None  # per stage
    eval_s_per_sample: float | None = None
    exact_metrics: dict[str, float] | None = None


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Reproduction:
    """One ``patchrec reproduce`` run (see the module docstring)."""

    def __init__(self, data: str, backbone: str, out: str | Path, scale: str | Scale, *, resume: bool = False,
                 protocol: str = "authors", progress: bool = True, seed: int = 0):  # fmt: skip
        from patchrec.data.source import load_data

        if isinstance(scale, Scale):
            self.scale, scale = scale, "custom"
        elif scale in SCALES:
            self.scale = SCALES[scale]
        else:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
        self.data, self.backbone = data, backbone
        self.out, self.resume, self.protocol = Path(out), resume, protocol
        self.progress, self.seed = progress, seed
        self.dataset = load_data(data)
        self.record = {"data": data, "backbone": backbone, "scale": scale, "seed": seed, "protocol": protocol,
                       **dataclasses.asdict(self.scale)}  # fmt: skip
        self._check_out()

    def _check_out(self) -> None:
        saved = _json(self.out / "reproduce_config.json")
        if saved is None:
            return
        if not self.resume:
            raise ValueError(f"--out {self.out} holds a reproduction already: pass --resume or a new --out")
        diff = {k: (saved.get(k), v) for k, v in self.record.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume with settings that differ from {self.out}/reproduce_config.json: "
                             f"{diff} (saved, now)")

    # ---- pieces ----------------------------------------------------------------------------------------
    def stage_config(self, stage: str):
        from patchrec.train.config import TrainConfig

        rel = released(self.dataset.name, stage)
        init = self.backbone if STAGE_INIT[stage] is None else str(self.out / "stages" / STAGE_INIT[stage])
        s = self.scale
        return TrainConfig(
            stage=stage, k=s.k, g=s.g or rel["g"], init=init, data=self.data, max_items=s.max_items,
            train_samples=s.train_samples, out=str(self.out / "stages" / stage), lr=s.lr or rel["lr"],
            weight_decay=rel["weight_decay"], warmup_ratio=rel["warmup_ratio"], grad_clip=rel["grad_clip"],
            epochs=1, batch_size=s.batch_size or rel["batch_size"], max_rows=s.max_rows, seed=self.seed,
            save_every=10, keep_checkpoints=1, log_every=1, progress=self.progress,
        )  # fmt: skip

    def train_stage(self, stage: str) -> dict[str, Any]:
        from patchrec.train.loop import train

        done = _json(self.out / "stages" / stage / "stage.json")
        if done is not None:
            return done
        result = train(self.stage_config(stage), resume=True)  # continues an interrupted stage
        # Steps and samples of the whole stage come from its log (a resumed call only saw the steps after its
        # checkpoint); the rates are this call's, and "resumed" says when they cover only part of the stage.
        lines = [json.loads(x) for x in (self.out / "stages" / stage / "log.jsonl").read_text().splitlines()]
        steps = [x for x in lines if "loss" in x]
        samples = sum(x["samples"] for x in steps)
        summary = {"stage": stage, "steps": steps[-1]["step"], "samples_trained": samples,
                   "rows_per_s": result.rows_per_s, "seconds": result.seconds,
                   "final_loss": result.final_loss, "resumed": result.samples_trained != samples}  # fmt: skip
        (self.out / "stages" / stage / "stage.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def test_samples(self):
        from patchrec.data.dataset import make_samples
        from patchrec.train.loop import random_subset

        test = make_samples(self.dataset, "test", self.scale.max_items)
        return random_subset(test, self.scale.test_samples, self.seed + 2)

    def evaluate_row(self, row: str, tokens, test) -> dict[str, Any]:
        import torch

        from patchrec.batching.plan import make_planner
        from patchrec.eval.evaluate import evaluate
        from patchrec.eval.metrics import write_results
        from patchrec.model.decoder import PackedDecoder

        stages, plan = ROW_STAGES[row]
        config = self.stage_config(stages[-1]) if stages else None
        planner = make_planner(plan, k=self.scale.k, g=config.g if config else self.scale.g or 5)
        rankings = ("beam", "exact") if self.scale.exact else ("beam",)
        results = {}
        model = None
        for ranking in rankings:
            path = self.out / "eval" / f"{row}-{ranking}.json"
            if path.is_file():
                results[ranking] = _json(path)
                continue
            if model is None:
                source = self.backbone if not stages else self.out / "stages" / stages[-1] / "model"
                model = PackedDecoder.from_pretrained(source, vocab_size=tokens.vocab_size,
                                                      dtype=torch.float32)  # fmt: skip
            res = evaluate(model, tokens, test, planner=planner, ranking=ranking, ks=(10, 20),
                           max_rows=self.scale.max_rows, progress=self.progress,
                           **({"protocol": self.protocol} if ranking == "beam" else {}))  # fmt: skip
            results[ranking] = write_results(
                path, ranks=res.ranks, mask_history=False, split="test", dataset=self.dataset.name, model=row,
                config={**res.config, "plan": plan, "k": planner.k, "g": planner.g, **self.record},
                ks=res.config["ks"], extra={"eval_seconds": res.seconds},
            )  # fmt: skip
        return results

    def baseline(self, name: str, test) -> dict[str, Any]:
        from transformers import set_seed

        from patchrec.baselines import GRU4Rec, Popularity, SASRec, SASRecConfig
        from patchrec.baselines import TrainConfig as IDTrainConfig
        from patchrec.baselines.train import evaluate, fit
        from patchrec.commands.baseline import DEFAULT_LR
        from patchrec.eval.metrics import rank_samples, write_results

        path = self.out / "baselines" / f"{name}.json"
        if path.is_file():
            return _json(path)
        set_seed(self.seed)
        start = time.perf_counter()
        if name == "popularity":
            ranks = rank_samples(Popularity.fit(self.dataset).scorer(test), test)
            extra: dict[str, Any] = {}
        else:
            L = self.scale.max_items
            model = SASRec(self.dataset.num_items, SASRecConfig(max_len=L)) if name == "sasrec" else (
                GRU4Rec(self.dataset.num_items))
            config = IDTrainConfig(seed=self.seed, lr=DEFAULT_LR[name], epochs=self.scale.baseline_epochs,
                                   max_minutes=self.scale.baseline_minutes)  # fmt: skip
            fitted = fit(model, self.dataset, config, max_len=L, progress=self.progress)
            ranks = evaluate(model, test)
            extra = {"training": dataclasses.asdict(fitted)}
        extra["seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_results(path, ranks=ranks, mask_history=False, split="test", dataset=self.dataset.name,
                             model=name, config={"max_items": self.scale.max_items, **self.record},
                             ks=(10, 20), extra=extra)  # fmt: skip

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self) -> list[RowResult]:
        from patchrec.batching.pack import history_token_counts
        from patchrec.batching.plan import make_planner
        from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
        from patchrec.stats import nominal_ratio

        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        (self.out / "reproduce_config.json").write_text(json.dumps(self.record, indent=1) + "\n")
        # Weights and checkpoints are GBs: the rest of the directory (logs, configs, results) is the record
        # of the run and can be committed as it is.
        (self.out / "stages" / ".gitignore").write_text("*/model/\n*/checkpoints/\n*/tokenizer/\n")
        test = self.test_samples()
        rows: list[RowResult] = []
        for name in BASELINES:
            res = self.baseline(name, test)
            rows.append(RowResult(name, res["metrics"], "exact"))
        stage_summaries = {}
        for stage in ("vanilla", "pretrain", "pft-i", "pft-s"):
            stage_summaries[stage] = self.train_stage(stage)
        tokens = tokenize_dataset(load_tokenizer(self.backbone), self.dataset)
        for row in LLM_ROWS:
            stages, plan = ROW_STAGES[row]
            results = self.evaluate_row(row, tokens, test)
            planner = make_planner(plan, k=self.scale.k, g=self.stage_config("pft-s").g)
            before, after = history_token_counts(test, planner, tokens)
            summaries = [stage_summaries[s] for s in stages]
            seconds = sum(s["seconds"] for s in summaries)
            beam = results["beam"]
            rows.append(RowResult(
                row, beam["metrics"], "beam", cr_measured=float(np.mean(before / np.maximum(after, 1))),
                cr_nominal=nominal_ratio(planner, self.scale.max_items, tokens.avg_title_tokens),
                train_rows_per_s=(sum(s["rows_per_s"] * s["seconds"] for s in summaries) / seconds
                                  if seconds else None),
                train_seconds=seconds or None,
                last_stage_seconds=summaries[-1]["seconds"] if summaries else None,
                samples_trained=summaries[-1]["samples_trained"] if summaries else None,
                steps=summaries[-1]["steps"] if summaries else None,
                eval_s_per_sample=beam["eval_seconds"] / max(beam["num_samples"], 1),
                exact_metrics=results["exact"]["metrics"] if "exact" in results else None,
            ))  # fmt: skip
        self.write_summary(rows, len(test))
        return rows

    def write_summary(self, rows: list[RowResult], num_test: int) -> None:
        from patchrec.reproduce_report import plot_summary, summary_table

        summary = {"settings": self.record, "test_samples": num_test, "mask_history": False,
                   "llm_ranking": f"beam ({self.protocol} protocol)",
                   "baseline_ranking": "exact (full catalog)",
                   "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (self.out / "summary.md").write_text(summary_table(summary) + "\n")
        plot_summary(summary, self.out / "summary.png")
