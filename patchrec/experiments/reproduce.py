"""``patchrec reproduce``: the paper's experiments on one backbone (what each experiment trains and evaluates:
``patchrec.experiments.reproduce_settings``).

Every LLM stage of a run trains on the same samples with the same samples per optimizer step and the same
number of steps; every LLM row is ranked with the authors' beam protocol (and exactly where the scale affords
it), in bf16 on CUDA and fp32 on CPU unless ``eval_dtype`` says otherwise (recorded per row).

Output directory::

    reproduce_config.json   the settings of the run (checked on --resume) and the experiments run so far
    stages/<stage>/         patchrec train runs (model/, log.jsonl, stage.json, checkpoints/ while training);
                            a .gitignore keeps the weights out of version control
    eval/<row>-<ranking>.json   patchrec.eval.metrics results files (raw ranks included)
    baselines/<name>.json   the ID baselines' results files (experiment table2)
    summary.json, summary.md, summary.png
    dry_run.json, dry_run.md    (--dry-run only) every stage and row with its samples, steps and estimated
                            LLM positions, FLOPs and GPU hours; nothing is trained

Everything is resumable: a finished stage or evaluation is skipped, an interrupted stage continues from its
newest checkpoint (``patchrec train --resume`` semantics, the same losses as an uninterrupted run). More
experiments can be added to a finished run with ``--resume``. Checkpoints: ``checkpoints_per_stage`` per
stage (every 1/N of its steps), the newest two kept, all deleted once the stage's model is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from patchrec.baselines.gru4rec import GRU4Rec
from patchrec.baselines.popularity import Popularity
from patchrec.baselines.run import DEFAULT_LR
from patchrec.baselines.sasrec import SASRec, SASRecConfig
from patchrec.baselines.train import TrainConfig as IDTrainConfig
from patchrec.baselines.train import evaluate as evaluate_baseline
from patchrec.baselines.train import fit
from patchrec.batching.pack import history_token_counts
from patchrec.batching.plan import make_planner
from patchrec.batching.stats import nominal_ratio
from patchrec.batching.tokens import load_tokenizer, tokenize_dataset
from patchrec.data.dataset import make_samples
from patchrec.data.source import load_data
from patchrec.eval.evaluate import evaluate
from patchrec.eval.metrics import rank_samples, write_results
from patchrec.experiments.reproduce_estimate import (
    ModelSize,
    Throughput,
    checkpoint_plan,
    cost_totals,
    eval_cost,
    format_checkpoint_plan,
    history_cost,
    model_size,
    save_every,
    stage_cost,
)
from patchrec.experiments.reproduce_report import dry_run_table, plot_summary, summary_table
from patchrec.experiments.reproduce_settings import (  # noqa: F401  (Scale, SCALES, released: part of this API)
    BASELINES,
    SCALES,
    RowSpec,
    Scale,
    experiment_rows,
    experiment_stages,
    length_name,
    released,
    resolve_preset,
)
from patchrec.experiments.stages import invocation, load_trained, ranked_test_samples
from patchrec.train.config import TrainConfig
from patchrec.train.loop import train
from patchrec.train.stage_inputs import random_subset, resolve_device

EVAL_DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32"}
KEEP_CHECKPOINTS = 2
# reproduce_config.json keys that may differ on --resume, and the values of keys older runs did not write.
FREE_KEYS = {"why", "experiments", "preset_source"}
LEGACY = {"authors_code": False, "eval_dtype": "float32"}


def resolve_eval_dtype(eval_dtype: str, device_type: str) -> str:
    """``auto``: bfloat16 on CUDA (what the authors rank in), float32 on CPU."""
    if eval_dtype not in EVAL_DTYPES:
        raise ValueError(f"--eval-dtype must be one of {sorted(EVAL_DTYPES)}, got {eval_dtype!r}")
    return EVAL_DTYPES[eval_dtype] or ("bfloat16" if device_type == "cuda" else "float32")


@dataclass
class RowResult:
    name: str
    metrics: dict[str, float]  # HR@10, HR@20, NDCG@10, NDCG@20 (beam protocol for LLM rows)
    ranking: str
    label: str | None = None
    experiment: str = "table2"
    plan: str | None = None  # the plan the row is evaluated with
    max_items: int | None = None  # history length L of the row (resolved: "all" is the longest history)
    length: str | None = None  # L as configured ("all" for the whole history)
    cr_measured: float | None = None  # mean over the evaluated samples of history tokens before / after
    cr_nominal: float | None = None  # a full L-item history with the catalog's mean title length
    history_tokens: float | None = None  # mean history title tokens per test sample after compression
    train_rows_per_s: float | None = None
    train_seconds: float | None = None  # all stages of the row (PFT rows: the shared pre-training included)
    last_stage_seconds: float | None = None  # the row's own last training stage
    samples_trained: int | None = None  # per stage
    steps: int | None = None  # per stage
    eval_s_per_sample: float | None = None
    eval_dtype: str | None = None
    exact_metrics: dict[str, float] | None = None


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Reproduction:
    """One ``patchrec reproduce`` run (see the module docstring)."""

    def __init__(self, data: str, backbone: str, out: str | Path, scale: str | Scale, *,
                 preset: str | None = None, experiments: tuple[str, ...] = ("table2",), resume: bool = False,
                 protocol: str = "authors", eval_dtype: str = "auto", device: str = "auto",
                 authors_code: bool = False, checkpoints_per_stage: int = 10, exact: bool | None = None,
                 progress: bool = True, seed: int = 0):  # fmt: skip
        if isinstance(scale, Scale):
            self.scale, scale = scale, "custom"
        elif scale in SCALES:
            self.scale = SCALES[scale]
        else:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
        if exact is not None:  # --no-exact: beam ranking only
            self.scale = dataclasses.replace(self.scale, exact=exact)
        if checkpoints_per_stage < 0:
            raise ValueError(f"--checkpoints-per-stage must be >= 0, got {checkpoints_per_stage}")
        self.data, self.backbone, self.experiments = data, backbone, tuple(experiments)
        self.out, self.resume, self.protocol = Path(out), resume, protocol
        self.progress, self.seed, self.authors_code = progress, seed, authors_code
        self.checkpoints_per_stage, self.device = checkpoints_per_stage, device
        self.eval_device = resolve_device(device)
        self.eval_dtype = resolve_eval_dtype(eval_dtype, self.eval_device.type)
        self.dataset = load_data(data)
        self.preset, self.preset_source = resolve_preset(self.dataset, preset, data)
        self.g = self.scale.g or released(self.preset, "pft-s")["g"]
        self.rows = experiment_rows(self.experiments, self.scale, self.g)
        self.stages = {s.name: s for s in experiment_stages(self.experiments, self.scale, self.g)}
        scale_fields = {k: v for k, v in dataclasses.asdict(self.scale).items() if k != "why"}
        self.record = json.loads(json.dumps(
            {"data": data, "backbone": backbone, "scale": scale, "seed": seed, "protocol": protocol,
             "preset": self.preset, "authors_code": authors_code, "eval_dtype": self.eval_dtype,
             **scale_fields}))  # fmt: skip
        self._check_out()
        self._tests: dict[int, Any] = {}
        self._size: ModelSize | None = None

    def _check_out(self) -> None:
        saved = _json(self.out / "reproduce_config.json")
        if saved is None:
            return
        if not self.resume:
            raise ValueError(f"--out {self.out} holds a reproduction already: pass --resume or a new --out")
        saved = {k: saved.get(k, LEGACY.get(k, v)) for k, v in self.record.items()}
        diff = {k: (saved[k], v) for k, v in self.record.items() if k not in FREE_KEYS and saved[k] != v}
        if diff:
            raise ValueError(f"--resume with settings that differ from {self.out}/reproduce_config.json: "
                             f"{diff} (saved, now)")

    # ---- sizes ---------------------------------------------------------------------------------------------
    def length(self, max_items: int) -> int:
        """L of a stage or row: 0 (all) is the dataset's longest history."""
        return max_items or int(np.diff(self.dataset.user_offsets).max(initial=1))

    def num_train(self) -> int:
        n = len(make_samples(self.dataset, "train", 1))  # the count does not depend on L
        return min(n, self.scale.train_samples) if self.scale.train_samples else n

    def batch_size(self, plan: str) -> int:
        return self.scale.batch_size or released(self.preset, plan)["batch_size"]

    def steps(self, plan: str) -> int:
        return -(-self.num_train() // self.batch_size(plan))

    def size(self, tokens) -> ModelSize:
        if self._size is None:
            self._size = model_size(self.backbone, tokens.vocab_size)
        return self._size

    # ---- pieces ----------------------------------------------------------------------------------------
    def stage_config(self, stage: str) -> TrainConfig:
        spec = self.stages[stage]
        rel = released(self.preset, spec.plan)
        init = self.backbone if spec.init is None else str(self.out / "stages" / spec.init)
        s = self.scale
        # --authors-code: the released pt.py's threshold global_step / max_steps is never positive (max_steps
        # stays -1 when training by epochs), so its pre-training compresses nothing: p = 0.
        p = 0.0 if self.authors_code and spec.plan == "pretrain" else None
        return TrainConfig(
            stage=spec.plan, k=spec.k, g=spec.g, p=p, init=init, data=self.data,
            max_items=self.length(spec.max_items), train_samples=s.train_samples,
            out=str(self.out / "stages" / stage), lr=s.lr or rel["lr"], weight_decay=rel["weight_decay"],
            warmup_ratio=rel["warmup_ratio"], grad_clip=rel["grad_clip"], epochs=1,
            batch_size=self.batch_size(spec.plan), max_rows=s.max_rows, seed=self.seed,
            save_every=save_every(self.steps(spec.plan), self.checkpoints_per_stage),
            keep_checkpoints=KEEP_CHECKPOINTS, log_every=1, progress=self.progress, device=self.device,
        )  # fmt: skip

    def train_stage(self, stage: str) -> dict[str, Any]:
        root = self.out / "stages" / stage
        done = _json(root / "stage.json")
        if done is not None:
            return done
        result = train(self.stage_config(stage), resume=True)  # continues an interrupted stage
        # Steps and samples of the whole stage come from its log (a resumed call only saw the steps after its
        # checkpoint); the rates are this call's, and "resumed" says when they cover only part of the stage.
        lines = [json.loads(x) for x in (root / "log.jsonl").read_text().splitlines()]
        steps = [x for x in lines if "loss" in x]
        samples = sum(x["samples"] for x in steps)
        summary = {"stage": stage, "steps": steps[-1]["step"], "samples_trained": samples,
                   "rows_per_s": result.rows_per_s, "seconds": result.seconds,
                   "final_loss": result.final_loss, "resumed": result.samples_trained != samples}  # fmt: skip
        (root / "stage.json").write_text(json.dumps(summary, indent=1) + "\n")
        # The stage is done (model/ written, stage.json marks it): its checkpoints are only disk now.
        shutil.rmtree(root / "checkpoints", ignore_errors=True)
        return summary

    def test_samples(self, max_items: int):
        """The seeded test subset at history length ``max_items`` (the same targets at every L)."""
        L = self.length(max_items)
        if L not in self._tests:
            self._tests[L] = ranked_test_samples(self.dataset, L, self.scale.test_samples, self.seed).samples
        return self._tests[L]

    def planner(self, row: RowSpec):
        return make_planner(row.plan, k=row.k, g=row.g)

    def evaluate_row(self, row: RowSpec, tokens) -> dict[str, Any]:
        planner, test = self.planner(row), self.test_samples(row.max_items)
        rankings = ("beam", "exact") if self.scale.exact else ("beam",)
        results = {}
        model = None
        for ranking in rankings:
            path = self.out / "eval" / f"{row.name}-{ranking}.json"
            if path.is_file():
                results[ranking] = _json(path)
                continue
            if model is None:
                source = self.backbone if row.stage is None else self.out / "stages" / row.stage / "model"
                model = load_trained(source, vocab_size=tokens.vocab_size,
                                     dtype=getattr(torch, self.eval_dtype), device=self.eval_device)
            res = evaluate(model, tokens, test, planner=planner, ranking=ranking, ks=(10, 20),
                           max_rows=self.scale.max_rows, progress=self.progress,
                           **({"protocol": self.protocol} if ranking == "beam" else {}))  # fmt: skip
            config = {**res.config, "plan": row.plan, "k": planner.k, "g": planner.g, "stage": row.stage,
                      "experiment": row.experiment, "max_items": self.length(row.max_items),
                      "dtype": self.eval_dtype, "device": str(self.eval_device), **self.record}  # fmt: skip
            results[ranking] = write_results(
                path, ranks=res.ranks, mask_history=False, split="test", dataset=self.dataset.name,
                model=row.name, config=config, ks=res.config["ks"], extra={"eval_seconds": res.seconds},
            )  # fmt: skip
        return results

    def baseline(self, name: str, test) -> dict[str, Any]:
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
            ranks = evaluate_baseline(model, test)
            extra = {"training": dataclasses.asdict(fitted)}
        extra["seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_results(path, ranks=ranks, mask_history=False, split="test", dataset=self.dataset.name,
                             model=name, config={"max_items": self.scale.max_items, **self.record},
                             ks=(10, 20), extra=extra)  # fmt: skip

    def tokens(self):
        return tokenize_dataset(load_tokenizer(self.backbone), self.dataset)

    def cost_curve(self, tokens) -> list[dict[str, Any]]:
        """Experiment long: history tokens and prompt rows per test sample against L, per plan (K = G =
        long_k), vanilla included (Fig. 8's cost curve, computed from the data: nothing is trained)."""
        k = self.scale.long_k
        curve = []
        for n in (self.scale.max_items, *self.scale.long_lengths):
            for plan in ("vanilla", "pft-i", "pft-s"):
                cost = history_cost(self.test_samples(n), make_planner(plan, k=k, g=k), tokens)
                curve.append({"length": length_name(n), "max_items": self.length(n), "plan": plan, "k": k,
                              **cost})  # fmt: skip
        return curve

    # ---- the run ---------------------------------------------------------------------------------------
    def write_config(self) -> None:
        saved = _json(self.out / "reproduce_config.json") or {}
        experiments = [*saved.get("experiments", []), *self.experiments]
        self.out.mkdir(parents=True, exist_ok=True)
        record = {**self.record, "why": self.scale.why, "preset_source": self.preset_source,
                  "experiments": list(dict.fromkeys(experiments))}  # fmt: skip
        (self.out / "reproduce_config.json").write_text(json.dumps(record, indent=1) + "\n")

    def run(self) -> list[RowResult]:
        self.write_config()
        (self.out / "stages").mkdir(parents=True, exist_ok=True)
        # Weights and checkpoints are GBs: the rest of the directory (logs, configs, results) is the record
        # of the run and can be committed as it is.
        (self.out / "stages" / ".gitignore").write_text("*/model/\n*/checkpoints/\n*/tokenizer/\n")
        tokens = self.tokens()
        todo = [s for s in self.stages if not (self.out / "stages" / s / "stage.json").is_file()]
        if todo:
            plan = checkpoint_plan(self.size(tokens), self.steps("vanilla"), self.checkpoints_per_stage,
                                   KEEP_CHECKPOINTS)  # fmt: skip
            print(format_checkpoint_plan(self.size(tokens), plan, len(todo)), flush=True)
        rows: list[RowResult] = []
        if "table2" in self.experiments:
            for name in BASELINES:
                res = self.baseline(name, self.test_samples(self.scale.max_items))
                L = self.scale.max_items
                rows.append(RowResult(name, res["metrics"], "exact", label=name, max_items=L,
                                      length=length_name(L)))  # fmt: skip
        summaries = {stage: self.train_stage(stage) for stage in self.stages}
        for row in self.rows:
            chain = self.chain(row.stage)
            results = self.evaluate_row(row, tokens)
            test, planner = self.test_samples(row.max_items), self.planner(row)
            before, after = history_token_counts(test, planner, tokens)
            done = [summaries[s] for s in chain]
            seconds = sum(s["seconds"] for s in done)
            rate = sum(s["rows_per_s"] * s["seconds"] for s in done) / seconds if seconds else None
            nominal = (nominal_ratio(planner, row.max_items, tokens.avg_title_tokens)
                       if row.max_items else None)  # "all" has no single full-history length
            beam = results["beam"]
            rows.append(RowResult(
                row.name, beam["metrics"], "beam", label=row.label, experiment=row.experiment, plan=row.plan,
                max_items=self.length(row.max_items), length=length_name(row.max_items),
                cr_measured=float(np.mean(before / np.maximum(after, 1))),
                cr_nominal=nominal, history_tokens=float(np.mean(after)), train_rows_per_s=rate,
                train_seconds=seconds or None, last_stage_seconds=done[-1]["seconds"] if done else None,
                samples_trained=done[-1]["samples_trained"] if done else None,
                steps=done[-1]["steps"] if done else None,
                eval_s_per_sample=beam["eval_seconds"] / max(beam["num_samples"], 1),
                eval_dtype=beam["config"].get("dtype", "float32"),
                exact_metrics=results["exact"]["metrics"] if "exact" in results else None,
            ))  # fmt: skip
        curve = self.cost_curve(tokens) if "long" in self.experiments else None
        self.write_summary(rows, curve)
        return rows

    def chain(self, stage: str | None) -> list[str]:
        """The stages a model went through, first to last."""
        if stage is None:
            return []
        init = self.stages[stage].init
        return [*self.chain(init), stage]

    def write_summary(self, rows: list[RowResult], curve: list[dict[str, Any]] | None) -> None:
        summary = {"command": invocation(), "settings": {**self.record, "preset_source": self.preset_source},
                   "experiments": list(self.experiments),
                   "test_samples": len(self.test_samples(self.scale.max_items)), "mask_history": False,
                   "llm_ranking": f"beam ({self.protocol} protocol)",
                   "baseline_ranking": "exact (full catalog)", "eval_dtype": self.eval_dtype,
                   "rows": [dataclasses.asdict(r) for r in rows], "cost_curve": curve}  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (self.out / "summary.md").write_text(summary_table(summary) + "\n")
        plot_summary(summary, self.out / "summary.png")

    # ---- the dry run -----------------------------------------------------------------------------------
    def stage_estimate(self, name: str, tokens, size: ModelSize) -> dict[str, Any]:
        """One stage of the dry run: its settings, samples, steps, estimated positions and checkpoints."""
        spec, config = self.stages[name], self.stage_config(name)
        train = random_subset(make_samples(self.dataset, "train", config.max_items), config.train_samples,
                              config.seed)  # fmt: skip
        planner = make_planner(config.stage, k=config.k, g=config.g, p=config.p)
        steps = self.steps(spec.plan)
        random = spec.plan in ("pretrain", "dropout")
        return {"stage": name, "plan": spec.plan, "init": spec.init or "backbone",
                "length": length_name(spec.max_items), "max_items": config.max_items,
                "k": config.k if spec.plan == "pft-i" else None,
                "g": config.g if spec.plan == "pft-s" else None,
                "p": ("0 (authors' code)" if config.p == 0.0 else "t/T") if random else None, "lr": config.lr,
                "batch_size": config.batch_size, "samples": len(train), "steps": steps,
                **stage_cost(train, planner, tokens, size, seed=self.seed),
                **checkpoint_plan(size, steps, self.checkpoints_per_stage, KEEP_CHECKPOINTS)}  # fmt: skip

    def dry_run(self, throughput: Throughput | None = None) -> dict[str, Any]:
        """Every stage and row of the run with its samples, steps and estimated positions, FLOPs and GPU
        hours (``patchrec.experiments.reproduce_estimate``); nothing is trained or evaluated. Writes
        dry_run.json/.md."""
        throughput = throughput or Throughput()
        tokens = self.tokens()
        size = self.size(tokens)
        first: dict[str, str] = {}  # stage -> the first experiment that needs it
        for e in self.experiments:
            for spec in experiment_stages((e,), self.scale, self.g):
                first.setdefault(spec.name, e)
        stages = [{**self.stage_estimate(name, tokens, size), "experiment": first[name]}
                  for name in self.stages]  # fmt: skip
        rows = []
        for row in self.rows:
            cost = eval_cost(self.test_samples(row.max_items), self.planner(row), tokens, size, beams=20,
                             exact=self.scale.exact)  # fmt: skip
            rows.append({"row": row.name, "label": row.label, "experiment": row.experiment,
                         "model": row.stage or "backbone", "plan": row.plan,
                         "length": length_name(row.max_items), **cost})  # fmt: skip
        out = {"command": invocation(), "settings": {**self.record, "preset_source": self.preset_source},
               "experiments": list(self.experiments), "dataset": self.dataset.name,
               "model": {**dataclasses.asdict(size), "checkpoint_gb": size.checkpoint_bytes / 1e9,
                         "model_gb": size.model_bytes / 1e9},
               "throughput_assumed": throughput.to_dict(), "stages": stages, "rows": rows,
               "totals": cost_totals(stages, rows, throughput, list(self.experiments)),
               "cost_curve": self.cost_curve(tokens) if "long" in self.experiments else None}  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "dry_run.json").write_text(json.dumps(out, indent=1) + "\n")
        (self.out / "dry_run.md").write_text(dry_run_table(out) + "\n")
        return out
