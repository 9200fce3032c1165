"""The GPU step planned without a GPU: one training step and one evaluation step of a configuration traced on
the meta device through patchrec's own code (the real planner and packer over a dataset's samples,
``PackedDecoder`` with its registered ops, the beam search's cached decoding, foreach AdamW), giving FLOPs,
bytes moved, memory and a roofline time per accelerator. Every figure it gives is PROJECTED, never measured
(``patchrec bench plan-gpu``).

What is traced. The model is built from its config alone on the meta device in bf16 (no weights; the
weights as bf16 autocast copies, the compute dtype of ``patchrec train`` on CUDA). Training: ``batch_size``
seeded training samples are planned and packed into micro-batches of at most ``max_rows`` rows exactly as
``patchrec train`` does; each runs forward and backward, then AdamW (foreach) steps over fp32 copies of the
parameters (gradient clipping, a norm and a scale per parameter, is not traced; AdamW's traced step is a
later one, the first creates the moments). Evaluation: the first batch of test samples that the evaluation
packs within ``max_rows`` runs its prompts once, then ``steps`` beam steps of ``beams`` beams per sample
(``authors_steps``: the authors' protocol generates at most the longest title's tokens; groups that finish
early make the real count smaller, so this is an upper bound; every beam is fed token 0, which changes no
shape).

How each figure is made:
- FLOPs: torch's flop formulas per op (matmuls; patchrec's ops through the formulas they register; ops with
  no formula, e.g. elementwise ones and AdamW, count 0). On meta tensors the attention formula only knows the
  longest sequence, so the attention FLOPs of each packed batch (training micro-batches and the evaluation's
  prompts) are rescaled to the exact (query, key) pairs of its real offsets (``attention_pairs``); the beam
  steps keep the shape bound.
- Bytes: per op, the bytes of its tensor inputs and outputs (views move none), ``patch_embed`` reading only
  the gathered table rows; the attention op reads q, k, v once and writes its output and log-sum-exp
  (flash-style, no [R, R] matrix: an ideal that fused kernels approach). Unfused elementwise ops each count
  their own traffic, so the figure is what eager mode moves, not what a compiler would fuse.
- Roofline time: the sum over ops of max(FLOPs / peak, bytes / bandwidth) at the accelerator's dense bf16
  tensor-core peak and HBM bandwidth (``ACCELERATORS``, with their sources): a lower bound; no kernel
  launch, synchronisation or Python overhead is added.
- Memory (training, mixed precision as ``patchrec train`` runs on CUDA): fp32 master weights, fp32
  gradients and AdamW's two fp32 moments (4 + 4 + 8 bytes per parameter) and the bf16 weight copies autocast
  keeps for backward (2); the activations autograd saves for backward in the largest micro-batch (each
  storage counted once); foreach AdamW's one fp32 temporary per parameter (4). The peak: the weights, copies
  and moments throughout, plus the larger of the backward (activations, and the gradients when earlier
  micro-batches have summed some: the first creates them as it frees activations, a later one also holds
  the incoming fp32 gradient of the largest parameter until it is added in) and the optimizer step
  (gradients and the temporary). Temporaries inside one op and the logits' transient buffers are not
  counted. ``trace_train(..., dtype=torch.float32)`` gives the same for an fp32 run (the weights are the
  master copy, no bf16 copies), which ``patchrec.experiments.gpu_plan_check`` measures on a CPU.
  Evaluation: the bf16 weights, the prompts' K/V cache, the beams' K/V cache at the last step.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from transformers import PretrainedConfig

from patchrec.batching.pack import PackedBatch, iter_batches
from patchrec.batching.plan import make_planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Samples
from patchrec.eval.beam import PackedBeamDecoder, TitleTrie, get_protocol
from patchrec.eval.exact import CatalogTitles
from patchrec.model.backbone import causal_lm_class, check_architecture, read_config
from patchrec.model.decoder import PRESETS, PackedDecoder, llama_config
from patchrec.train.parallel import make_adamw, param_groups
from patchrec_kernels.varlen_ops import attention_pairs


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak (no structured sparsity)
    hbm_gb_s: float  # memory bandwidth
    source: str  # where the two figures come from


ACCELERATORS = {
    "H100": Accelerator("NVIDIA H100 SXM5 80GB", 989.4, 3350.0,
                        "NVIDIA H100 Tensor Core GPU datasheet: 1,979 TFLOPS bf16 with sparsity (half "
                        "dense), 3.35 TB/s HBM3 (SXM5)"),
    "A100": Accelerator("NVIDIA A100 SXM4 80GB", 312.0, 2039.0,
                        "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS bf16 dense (624 with sparsity), "
                        "2,039 GB/s HBM2e (80GB SXM4)"),
}  # fmt: skip
# Training memory per parameter that lives through the step: mixed precision (bf16 compute, as on CUDA):
# fp32 master weights, gradients, AdamW's two moments, the bf16 copies autocast keeps for backward; fp32 (as
# on CPU): the weights themselves are the master copy.
TRAIN_BYTES_PER_PARAM = {"master_fp32": 4, "grad_fp32": 4, "adamw_fp32": 8, "autocast_bf16": 2}
FP32_BYTES_PER_PARAM = {"master_fp32": 4, "grad_fp32": 4, "adamw_fp32": 8}
# foreach AdamW's step holds one fp32 temporary per parameter (the sqrt of the second moments of all tensors
# at once) while no activation is alive (see trace_train's peak).
ADAMW_TEMPORARY_BYTES = 4
ATTENTION_OPS = ("patchrec.varlen_attention", "patchrec.varlen_attention_backward")
PLANS = ("vanilla", "pft-i", "pft-s")
NO_COPY_OPS = ("aten._unsafe_view", "aten.lift_fresh")  # reshapes / wraps without moving data


@dataclass(frozen=True)
class StepSettings:
    """One configuration's training and evaluation step."""

    plan: str  # vanilla | pft-i | pft-s
    max_items: int  # history length L
    k: int  # PFT-I: items kept as text
    g: int  # PFT-S: session size
    batch_size: int  # training samples per optimizer step
    max_rows: int  # micro-batch budget (rows), training and evaluation
    beams: int = 20  # beam search: beams per sample
    steps: int = 0  # beam steps after the first token (0: none, prompt encoding only)
    seed: int = 0  # which training samples make the step

    def __post_init__(self):
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        for name in ("max_items", "k", "g", "batch_size", "max_rows", "beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclass
class OpCost:
    calls: int = 0
    flops: int = 0
    bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # roofline per accelerator


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def roofline_seconds(flops: float, moved: float) -> dict[str, float]:
    """Per accelerator: max(FLOPs / peak, bytes / bandwidth) of one op."""
    return {key: max(flops / (a.bf16_tflops * 1e12), moved / (a.hbm_gb_s * 1e9))
            for key, a in ACCELERATORS.items()}  # fmt: skip


class OpCosts(TorchDispatchMode):
    """Per op: calls, FLOPs (torch's flop formulas), bytes read and written, and its roofline seconds.
    ``attention_scale`` multiplies the attention ops' FLOPs (exact pairs / the meta shape bound)."""

    def __init__(self):
        super().__init__()
        self.ops: dict[str, OpCost] = {}
        self.attention_scale = Fraction(1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        name = packet._qualified_op_name.replace("::", ".")
        if name in ATTENTION_OPS:
            flops = int(flops * self.attention_scale)  # exact: the bound divides the formula's count
        if name == "patchrec.patch_embed":  # reads the T gathered rows of the table, not all V
            weight, token_ids = args[0], args[1]
            gathered = token_ids.numel() * weight.shape[1] * weight.element_size()
            moved = _nbytes(_tensors([token_ids, args[2], args[3], out])) + gathered
        elif _is_view(func) or name in NO_COPY_OPS:
            moved = 0
        else:
            moved = _nbytes(_tensors(list(args) + list(kwargs.values()))) + _nbytes(_tensors(out))
        cost = self.ops.setdefault(name, OpCost())
        cost.calls, cost.flops, cost.bytes = cost.calls + 1, cost.flops + int(flops), cost.bytes + moved
        for key, seconds in roofline_seconds(flops, moved).items():
            cost.seconds[key] = cost.seconds.get(key, 0.0) + seconds
        return out

    def totals(self) -> dict[str, Any]:
        ops = self.ops.values()
        seconds = {key: sum(c.seconds.get(key, 0.0) for c in ops) for key in ACCELERATORS}
        return {"flops": sum(c.flops for c in ops), "bytes": sum(c.bytes for c in ops), "seconds": seconds}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the context, each storage counted once and
    the storages of ``exclude`` (the weights, counted on their own) not at all."""

    def __init__(self, exclude=()):
        self.skip = {t.untyped_storage()._cdata for t in exclude}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in self.skip:  # the storage's address: unique while the saved tensor lives
            self.storages[storage._cdata] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def meta_decoder(
    config: PretrainedConfig, vocab_size: int, dtype: torch.dtype = torch.bfloat16
) -> PackedDecoder:
    """The config's family with its vocabulary grown to ``vocab_size``, on the meta device in ``dtype``."""
    config = copy.deepcopy(config)
    config.vocab_size = max(int(config.vocab_size), vocab_size)
    with torch.device("meta"):
        lm = causal_lm_class(config)(config).to(dtype)
    return PackedDecoder(lm)


def exact_attention_scale(batch: PackedBatch) -> Fraction:
    """Exact (query, key) pairs of a packed batch's causal sequences / the bound its shapes give on meta."""
    rows = int(batch.cu_seqlens[-1])
    longest = batch.max_seqlen
    bound = attention_pairs(batch.cu_seqlens.to("meta"), None, longest, longest, rows, True)
    exact = attention_pairs(batch.cu_seqlens, None, longest, longest, rows, True)
    return Fraction(exact, bound) if bound else Fraction(1)


def train_batches(samples: Samples, tokens: TokenizedDataset, settings: StepSettings) -> list[PackedBatch]:
    """The micro-batches of one optimizer step: ``batch_size`` seeded samples, packed as training packs."""
    if len(samples) < settings.batch_size:
        raise ValueError(f"batch_size {settings.batch_size} exceeds the {len(samples)} training samples")
    planner = make_planner(settings.plan, k=settings.k, g=settings.g)
    rng = np.random.default_rng(settings.seed)
    order = np.sort(rng.choice(len(samples), settings.batch_size, replace=False))
    return list(iter_batches(samples, planner, tokens, settings.max_rows, order=order))


def project_train(config: PretrainedConfig, tokens: TokenizedDataset, samples: Samples,
                  settings: StepSettings) -> dict[str, Any]:  # fmt: skip
    """One training step traced on meta: its figures (see the module docstring)."""
    return trace_train(config, tokens.vocab_size, train_batches(samples, tokens, settings))


def projected_peak(memory: dict[str, int], micro_batches: int) -> int:
    """A training step's peak from ``trace_train``'s components. The weights (and bf16 copies) and AdamW's
    moments live throughout; on top, the larger of the backward (the saved activations, plus the gradients
    when earlier micro-batches have summed some: the first micro-batch creates them as it frees
    activations; a later one also holds the incoming gradient of the largest parameter until it is added
    in) and the optimizer step (the gradients and AdamW's temporary). Measured on CPU:
    ``patchrec.experiments.gpu_plan_check``."""
    grads, activations, temporary = memory["grad_fp32"], memory["activations"], memory["adamw_temporary"]
    incoming = memory["grad_accumulation"]
    lasting = sum(memory.values()) - grads - activations - temporary - incoming
    summed = grads + incoming if micro_batches > 1 else 0
    return lasting + max(activations + summed, grads + temporary)


def trace_train(config: PretrainedConfig, vocab_size: int, batches: list[PackedBatch],
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:  # fmt: skip
    """One optimizer step over ``batches`` traced on meta, computing in ``dtype``: bf16 is mixed precision
    (fp32 master weights, bf16 copies), fp32 the weights themselves (how a CPU run trains)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    model = meta_decoder(config, vocab_size, dtype).train()
    costs, activations = OpCosts(), 0
    with costs:
        for batch in batches:
            costs.attention_scale = exact_attention_scale(batch)
            with SavedBytes(exclude=list(model.parameters())) as saved:
                out = model(batch.to("meta"), validate=False)
            out.loss.backward()
            activations = max(activations, saved.total)
            del out
        costs.attention_scale = Fraction(1)
    master = copy.deepcopy(model).float()  # AdamW steps fp32 weights
    for p, q in zip(master.parameters(), model.parameters(), strict=True):
        p.grad = torch.empty_like(p) if q.grad is not None else None
    optimizer = make_adamw(param_groups(master, 0.0)[0], lr=1e-5)
    optimizer.step()  # the first step creates the moments: the step traced is a later one
    with costs:
        optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    per_param = TRAIN_BYTES_PER_PARAM if dtype == torch.bfloat16 else FP32_BYTES_PER_PARAM
    memory = {name: params * size for name, size in per_param.items()}
    memory["activations"] = activations
    memory["adamw_temporary"] = params * ADAMW_TEMPORARY_BYTES
    largest = max(p.numel() for p in model.parameters())
    memory["grad_accumulation"] = 4 * largest if len(batches) > 1 else 0
    rows = sum(b.num_rows for b in batches)
    return {"step": "train", "micro_batches": len(batches), "rows": rows, "params": params,
            "sequences": sum(b.num_sequences for b in batches), "dtype": str(dtype).removeprefix("torch."),
            "labels": sum(int(b.label_rows.numel()) for b in batches), **costs.totals(), "memory": memory,
            "memory_total": projected_peak(memory, len(batches)),
            "ops": _op_table(costs)}  # fmt: skip


def project_eval(config: PretrainedConfig, tokens: TokenizedDataset, samples: Samples,
                 settings: StepSettings) -> dict[str, Any]:  # fmt: skip
    """One evaluation batch traced on meta: prompts once, then the beam steps (module docstring)."""
    model = meta_decoder(config, tokens.vocab_size).eval()
    planner = make_planner(settings.plan, k=settings.k, g=settings.g)
    batch = next(iter_batches(samples, planner, tokens, settings.max_rows, answer=False))
    queries = batch.num_sequences
    seqs = [s for s in range(queries) for _ in range(settings.beams)]
    costs = OpCosts()
    with torch.no_grad(), costs:
        costs.attention_scale = exact_attention_scale(batch)
        decoder = PackedBeamDecoder(model, batch.to("meta"))
        costs.attention_scale = Fraction(1)
        for step in range(1, settings.steps + 1):
            decoder.step(list(range(len(seqs))), [0] * len(seqs), seqs, step)
    params = sum(p.numel() for p in model.parameters())
    memory = {"weights_bf16": 2 * params, "prompt_kv": _nbytes(decoder.cache.keys + decoder.cache.values),
              "beam_kv": _nbytes((decoder.past_k or []) + (decoder.past_v or []))}  # fmt: skip
    return {"step": "eval", "sequences": queries, "rows": batch.num_rows, "beams": settings.beams,
            "beam_steps": settings.steps, "params": params, **costs.totals(), "memory": memory,
            "memory_total": sum(memory.values()), "ops": _op_table(costs)}  # fmt: skip


def model_config(model: str, vocab_size: int) -> PretrainedConfig:
    """A model preset's config (``patchrec.model.decoder.PRESETS``, e.g. ``llama-3.2-1b``) or a local HF
    directory's / ``.gguf`` file's (only its config is read)."""
    if model in PRESETS:
        return llama_config(model, vocab_size)
    config = read_config(model)
    check_architecture(config, model)
    return config


def authors_steps(tokens: TokenizedDataset) -> int:
    """Beam steps after the first token under the authors' protocol for this catalog (an upper bound)."""
    trie = TitleTrie(CatalogTitles.from_table(tokens.titles), tokens.prompt.eot)
    return max(get_protocol("authors").steps(trie) - 1, 0)


def project(config: PretrainedConfig, tokens: TokenizedDataset, train: Samples, test: Samples,
            settings: list[StepSettings]) -> list[dict[str, Any]]:  # fmt: skip
    """The training and evaluation step of each setting, labelled with the setting."""
    results = []
    for s in settings:
        label = {"projected": True, "settings": asdict(s)} | {"plan": s.plan}
        results.append(label | project_train(config, tokens, train, s))
        results.append(label | project_eval(config, tokens, test, s))
    return results


def _op_table(costs: OpCosts) -> dict[str, dict[str, Any]]:
    ranked = sorted(costs.ops.items(), key=lambda kv: -kv[1].seconds.get("H100", 0.0))
    return {name: {"calls": c.calls, "flops": c.flops, "bytes": c.bytes, "seconds": c.seconds}
            for name, c in ranked}  # fmt: skip


def format_projection(results: list[dict[str, Any]], top: int = 5) -> str:
    """The projections as text, every figure labelled PROJECTED."""
    lines = ["PROJECTED (meta-device trace, no GPU run): FLOPs, bytes, memory, roofline lower bounds", ""]
    for r in results:
        per = r["sequences"]
        head = (f"PROJECTED {r['plan']} {r['step']}: {r['sequences']} sequences, {r['rows']:,} rows"
                + (f", {r['micro_batches']} micro-batches" if r["step"] == "train" else
                   f", {r['beams']} beams x {r['beam_steps']} steps"))  # fmt: skip
        lines.append(head)
        lines.append(f"  FLOPs {r['flops'] / 1e12:.3f} T ({r['flops'] / per / 1e9:.1f} G per sequence), "
                     f"bytes moved {r['bytes'] / 1e9:.2f} GB")  # fmt: skip
        lines.append("  memory " + ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in r["memory"].items())
                     + f" MiB; peak {r['memory_total'] / 2**20:,.1f} MiB")  # fmt: skip
        for key, sec in r["seconds"].items():
            lines.append(f"  roofline {key}: {sec * 1e3:.2f} ms ({sec / per * 1e3:.3f} ms per sequence)")
        for name, op in list(r["ops"].items())[:top]:
            h100 = op["seconds"].get("H100", 0.0)
            lines.append(f"    {name}: {op['calls']} calls, {op['flops'] / 1e9:.1f} GFLOP, "
                         f"{op['bytes'] / 1e9:.2f} GB, H100 {h100 * 1e3:.2f} ms")  # fmt: skip
        lines.append("")
    for key, a in ACCELERATORS.items():
        lines.append(f"peak {key}: {a.name}, {a.bf16_tflops} TFLOPS bf16 dense, {a.hbm_gb_s} GB/s "
                     f"({a.source})")  # fmt: skip
    return "\n".join(lines)


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per plan: its training step and its evaluation per sample, every figure PROJECTED."""
    head = ["plan (PROJECTED)", "train rows", "train TFLOP", "train memory GiB", "train H100 ms",
            "train A100 ms", "eval GFLOP / sample", "eval H100 ms / sample",
            "eval A100 ms / sample"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    steps = {(r["plan"], r["step"]): r for r in results}
    for plan in dict.fromkeys(r["plan"] for r in results):
        t, e = steps[plan, "train"], steps[plan, "eval"]
        per = e["sequences"]
        cells = [plan, f"{t['rows']:,}", f"{t['flops'] / 1e12:.1f}", f"{t['memory_total'] / 2**30:.1f}",
                 f"{t['seconds']['H100'] * 1e3:.0f}", f"{t['seconds']['A100'] * 1e3:.0f}",
                 f"{e['flops'] / per / 1e9:.0f}", f"{e['seconds']['H100'] / per * 1e3:.2f}",
                 f"{e['seconds']['A100'] / per * 1e3:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ACCELERATORS", "PLANS", "Accelerator", "OpCosts", "SavedBytes", "StepSettings", "authors_steps",
           "exact_attention_scale", "format_projection", "markdown_table", "meta_decoder", "model_config",
           "project", "project_eval", "project_train", "roofline_seconds", "train_batches"]  # fmt: skip
