"""What every bench runs on: the device, the model preset and dtype that fit it, and ../shared.

On CUDA the benches use Llama-3.2-1B shapes in bf16 (random weights, no hub); on a CPU the tiny preset in
fp32, so that the whole suite stays within minutes.
"""

from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
PRESET = "llama-3.2-1b" if HAS_CUDA else "tiny"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else "cpu"


def sync() -> None:
    """Wait for queued GPU work, so that a timed region covers it."""
    if HAS_CUDA:
        torch.cuda.synchronize()


def measured_seconds(benchmark, stat: str = "median") -> float:
    """A timing statistic of ``benchmark``, or NaN under ``--benchmark-disable`` (the body ran once, untimed,
    as a smoke test: the rates derived from it are NaN rather than an error)."""
    stats = benchmark.stats
    return float(getattr(stats.stats, stat)) if stats is not None else float("nan")
