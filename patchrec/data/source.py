"""Where a command's dataset comes from: a release directory, or ``"synthetic"``, the embedded default that
every command can run on without files.

``"synthetic"`` means the same dataset in every command (``DEFAULT_SYNTHETIC``), so that a model trained with
``patchrec train --data synthetic`` is evaluated by ``patchrec eval --data synthetic`` on its own users. For
another synthetic dataset, write it once with ``patchrec prepare --synthetic ... --out DIR`` and pass DIR.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from patchrec.data.dataset import Dataset
from patchrec.data.release import load_release
from patchrec.data.synthetic import SyntheticConfig, make_synthetic

SYNTHETIC = "synthetic"
# Small enough for CPU runs in minutes, with topic structure a sequence model can learn beyond popularity.
DEFAULT_SYNTHETIC = SyntheticConfig(num_users=1000, num_items=200, mean_length=40.0, num_topics=10)


def load_data(spec: str | Path, synthetic: SyntheticConfig | None = None) -> Dataset:
    """``spec`` = a release directory (``patchrec.data.release``) or ``"synthetic"`` (``synthetic``, by
    default ``DEFAULT_SYNTHETIC``)."""
    if str(spec) == SYNTHETIC:
        return make_synthetic(**dataclasses.asdict(synthetic or DEFAULT_SYNTHETIC))
    return load_release(spec)
