"""One LLM user served from PerSRec's rolling memory as interactions arrive (the LLM side of
``patchrec.persrec.sequence.CachedUser``).

The state is the user's memory, k vectors of the model's width, whatever the history length. ``add`` folds
every segment of N items that leaves the open segment into it, one fold pass each (the same pass the
training batches run: ``Packer.fold_pass``, ``PackedDecoder.fold_pass``); ``prompt_batch`` packs the prompt
of the open segment with the memory written into its memory rows, ready for ``patchrec.eval`` (exact ranking,
beam search) or ``first_logprobs``. After any sequence of ``add`` calls the prompt equals the one the packed
forward builds from the whole timeline (``tests/test_persrec_llm_layouts.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from patchrec.batching.pack import PackedBatch, Packer, pack_batch
from patchrec.batching.persrec_layouts import num_segments
from patchrec.batching.plan import Planner
from patchrec.batching.tokens import TokenizedDataset
from patchrec.data.dataset import Dataset, history_samples


class RollingLLMUser:
    """A user's rolling PerSRec memory on the LLM (see the module docstring)."""

    def __init__(self, model, tokens: TokenizedDataset, dataset: Dataset, planner: Planner, items=()) -> None:
        config = planner.persrec
        if config is None or config.layout != "rolling":
            raise ValueError("RollingLLMUser needs the persrec plan with --persrec-layout rolling")
        self.model, self.tokens, self.dataset = model, tokens, dataset
        self.planner, self.config = planner, config
        self.packer = Packer(tokens, answer=False)
        ids = torch.as_tensor(tokens.persrec_ids[: config.tokens], dtype=torch.long)
        device = next(model.parameters()).device
        with torch.no_grad():
            self.memory = model.initial_memory(ids.to(device), 1).clone()
        self.open = np.zeros(0, dtype=np.int64)
        self.folded = 0  # segments folded so far
        self.add(items)

    @property
    def state_bytes(self) -> int:
        return self.memory.nelement() * self.memory.element_size()

    def add(self, items) -> None:
        """Append interactions (item ids, oldest first); fold the segments that leave the open segment."""
        new = np.asarray(items, dtype=np.int64).reshape(-1)
        if new.size and (new.min() < 0 or new.max() >= self.dataset.num_items):
            raise ValueError(f"items must be ids in [0, {self.dataset.num_items})")
        pending = np.concatenate([self.open, new])
        n = self.config.segment
        fold = int(num_segments(np.array([len(pending)]), n)[0]) if len(pending) else 0
        text = self.planner.old == "text"
        with torch.no_grad():
            for j in range(fold):  # each segment reads the memory the previous one wrote
                segment = self.packer.fold_pass(pending[None, j * n : (j + 1) * n], text, self.config.tokens)
                self.memory = self.model.fold_pass(segment.to(self.memory.device), self.memory)
        self.folded += fold
        self.open = pending[fold * n :]

    def prompt_batch(self) -> PackedBatch:
        """The prompt of the open segment, its memory rows reading the user's memory (no answer rows)."""
        if not len(self.open):
            raise ValueError("the user has no interactions yet: add some before asking for a prompt")
        samples = history_samples(self.dataset, [self.open])
        (plans,) = self.planner.plan_batch(samples.history_lengths)
        batch = pack_batch(samples, np.arange(1), (plans,), self.tokens, answer=False, persrec=self.config)
        batch = batch.to(self.memory.device)
        batch.memory = self.memory
        return batch

    def first_logprobs(self) -> torch.Tensor:
        """fp32 [V] log-probabilities of the answer's first token given the user's prompt."""
        model, batch = self.model, self.prompt_batch()
        with torch.no_grad():
            hidden = model.decode(model.embed(batch), batch.position_ids, model.batch_plan(batch))
            return model.logprobs(hidden[-1:])[0]
