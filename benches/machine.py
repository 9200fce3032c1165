"""What every bench runs on: the device, the model preset and dtype that fit it, and ../shared.

On CUDA the benches use Llama-3.2-1B shapes in bf16 (random weights, no hub); on a CPU the tiny preset in
fp32, so that the whole suite stays within minutes.
"""

import os
import threading
import time
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak(fn) -> tuple[int, str]:
    """Peak bytes allocated by one call of ``fn`` above what was held before it, and how it was measured."""
    if HAS_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated - allocated before"
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base, "cpu RSS sampled every 1 ms (/proc/self/statm) - RSS before"
