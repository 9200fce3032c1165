"""The memory bandwidth of a plain device copy, measured in the same run as the kernel benches, so that their
GB/s read as a fraction of what this machine's memory delivers (``patchrec bench gpu`` reports that ratio).

``gb_per_s`` counts the bytes read plus the bytes written (twice the buffer), the convention of
``bench_patch_embed``'s bytes model. CUDA: a 1 GiB buffer, far past any L2; CPU: 64 MiB, one thread (see
``one_thread``).
"""

from __future__ import annotations

import torch
from machine import DEVICE, HAS_CUDA, device_name, measured_seconds, sync

SIZE = (1 << 30) if HAS_CUDA else (64 << 20)
ROUNDS = 30 if HAS_CUDA else 10


def test_hbm_copy_bandwidth(benchmark):
    src = torch.ones(SIZE, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark.group = "hbm_copy"
    benchmark.pedantic(lambda: (dst.copy_(src), sync()), rounds=ROUNDS, warmup_rounds=2, iterations=1)
    assert torch.equal(dst[:: 1 << 20], src[:: 1 << 20])
    moved = 2 * SIZE
    benchmark.extra_info.update(
        provider="copy",
        bytes=moved,
        gb_per_s=moved / measured_seconds(benchmark) / 1e9,
        bytes_model="buffer read + buffer written",
        device=device_name(),
    )
