"""DDP and FSDP2 wrappers of a ``PackedDecoder`` for data-parallel training; its world-size independent state.

- ``ddp``: ``DistributedDataParallel``, one full replica per rank; gradients are all-reduced in buckets
  during the last micro-batch's backward (``no_sync`` before it). Buffers are not broadcast (the only ones are
  RoPE frequencies, identical everywhere), so a forward is never a collective.
- ``fsdp``: FSDP2, ``fully_shard`` on every decoder layer and then on the root (embeddings, final norm, tied
  output head): parameters, gradients and AdamW state are sharded; each layer's weights are all-gathered for
  its forward and backward and its gradients reduce-scattered. Master weights stay fp32; on CUDA the compute
  is bf16 through ``MixedPrecisionPolicy`` (gradients reduced in fp32).

Both average gradients over ranks, while the loop wants their SUM (each rank's loss is already divided by
the step's global answer-token count): the loss is multiplied by ``world_size`` (``loss_scale``).

Checkpoint state, the same for one process, DDP and FSDP, so a run resumes on any world size and mode: the
full model (safetensors, written by rank 0) and the full AdamW state in ``optimizer.state_dict()`` layout,
parameters numbered in optimizer order (``param_groups``: the decay group then the no-decay group, each in
``named_parameters`` order). FSDP gathers both with ``torch.distributed.checkpoint.state_dict``
(``full_state_dict=True, cpu_offload=True``: only rank 0 holds them, in CPU memory).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from patchrec.model.decoder import PackedDecoder
from patchrec.train.config import ADAMW_IMPLS, PARALLEL
from patchrec.train.distributed import DistContext


def resolve_mode(parallel: str, ctx: DistContext) -> str | None:
    """None for a single process (no process group); ``auto`` is ``ddp`` under a launcher."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if not ctx.active:
        return None
    return "ddp" if parallel == "auto" else parallel


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict[str, Any]], list[str]]:
    """AdamW groups of the trainable parameters (matrices decayed, norms not: decaying them hurts; nor what
    the model's ``no_weight_decay`` names, e.g. a table only some rows of which train) and their names in
    optimizer order (the numbering of the checkpoint's optimizer state)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay = [(n, p) for n, p in named if p.ndim >= 2 and n not in exempt]
    no_decay = [(n, p) for n, p in named if p.ndim < 2 or n in exempt]
    groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]  # fmt: skip
    return groups, [n for n, _ in decay + no_decay]


def make_adamw(groups: list[dict[str, Any]], *, lr: float, impl: str = "foreach") -> torch.optim.AdamW:
    """The training AdamW (betas 0.9 / 0.999, eps 1e-8) over ``param_groups``' groups.

    ``impl`` (``patchrec.train.config.ADAMW_IMPLS``): "foreach" is bitwise the per-tensor loop torch picks on
    CPU by default, with one temporary per tensor instead of two (a fresh [V, D] buffer costs page faults on
    CPU every step); "fused" updates each tensor in one kernel, several times faster on CPU, rounding
    differently (about 1 ulp per step), so it is an explicit choice."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"adamw must be one of {ADAMW_IMPLS}, got {impl!r}")
    flag = {"foreach": True} if impl == "foreach" else {"fused": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **flag)


def wrap(
    model: PackedDecoder, mode: str | None, ctx: DistContext, device: torch.device, bf16: bool
) -> nn.Module:
    """``model`` (on ``device``, fp32) ready for ``mode``; None returns it unchanged."""
    if mode is None:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers.
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       **no_sync)  # fmt: skip
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ctx.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()  # fmt: skip
        for layer in model.lm.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    raise ValueError(f"unknown parallel mode {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PackedDecoder`` inside a DDP wrapper (an FSDP2 model is its own module)."""
    return getattr(model, "module", model)


def loss_scale(mode: str | None, ctx: DistContext) -> float:
    return float(ctx.world_size) if mode is not None else 1.0


def accumulating(model: nn.Module, mode: str | None, sync: bool):
    """Context of one micro-batch's forward + backward: DDP communicates only when ``sync`` (the last one)."""
    if mode == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm; returns the norm before clipping (the same on every rank)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor of the reduced norm
        norm = norm.full_tensor()
    return float(norm)


# ---- state -------------------------------------------------------------------------------------------------
def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> PackedDecoder:
    """A plain ``PackedDecoder`` with ``model``'s config and buffers and the full weights ``state`` (no random
    init: built on the meta device, then materialised)."""
    source = unwrap(model).lm
    with torch.device("meta"):
        lm = type(source)(source.config)  # the model's own family class
    plain = PackedDecoder(lm).to_empty(device=device)
    plain.lm.tie_weights()  # to_empty gives each module of a tied pair its own tensor
    plain.load_state_dict(state, strict=True)
    own = dict(plain.named_buffers())
    with torch.no_grad():
        for name, buf in unwrap(model).named_buffers():
            own[name].copy_(buf)
    return plain.float()


def gather_full_model(model: nn.Module, mode: str | None, device: torch.device, *, all_ranks: bool):
    """A plain ``PackedDecoder`` with the full current weights: FSDP gathers them (to rank 0 in CPU memory, or
    with ``all_ranks`` to every rank on ``device``; a collective), otherwise it is the model itself. Ranks
    without a copy get None."""
    if mode != "fsdp":
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=not all_ranks))
    if not state:
        return None
    return plain_copy(model, state, device if all_ranks else torch.device("cpu"))


def full_optimizer_state(model: nn.Module, optimizer, mode: str | None, names: list[str]) -> dict | None:
    """The full AdamW state in the checkpoint layout (None on the ranks of FSDP other than 0)."""
    if mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return _by_index(state, names) if state else None


def load_optimizer_state(
    model: nn.Module, optimizer, saved: dict, mode: str | None, names: list[str]
) -> None:
    """Load a checkpoint's full AdamW state (any world size); FSDP keeps this rank's shard of it."""
    if mode != "fsdp":
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(saved, names), options=_full_options())


def _by_index(state: dict, names: list[str]) -> dict:
    """Parameter-name keyed optimizer state (``get_optimizer_state_dict``) -> ``optimizer.state_dict()``
    layout (parameters numbered in ``names`` order)."""
    index = {n: i for i, n in enumerate(names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    if sorted(i for g in groups for i in g["params"]) != list(range(len(names))):
        raise ValueError("optimizer state does not cover the model's parameters exactly once")
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _by_name(state: dict, names: list[str]) -> dict:
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


__all__ = ["PARALLEL", "accumulating", "clip_grad_norm", "full_optimizer_state", "gather_full_model",
           "load_optimizer_state", "loss_scale", "make_adamw", "param_groups", "plain_copy", "resolve_mode",
           "unwrap", "wrap"]
