"""ID-based sequential-recommendation baselines (popularity, SASRec, HSTU, GRU4Rec), their shared training
loop, and ``run``: one run end to end as ``patchrec baseline`` does it (``run_baseline``).

They rank the whole catalog like the LLM models (``patchrec.eval.metrics``), on the same samples
(docs/method.md §4), so their numbers sit in the same table.
"""

from patchrec.baselines.gru4rec import GRU4Rec, GRU4RecConfig
from patchrec.baselines.hstu import HSTU, HSTUConfig
from patchrec.baselines.popularity import Popularity
from patchrec.baselines.sasrec import SASRec, SASRecConfig
from patchrec.baselines.train import TrainConfig, TrainResult, evaluate, fit

__all__ = [
    "GRU4Rec",
    "GRU4RecConfig",
    "HSTU",
    "HSTUConfig",
    "Popularity",
    "SASRec",
    "SASRecConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "fit",
]
