"""The slow, obvious materialisation of one sample's input rows, to check ``patchrec.pack`` against.

Per sample and plan it calls the tokenizer on each title and on the two prompt halves (no CSR table, no
vectorisation) and builds a Python list of embedding rows: a text token is ``E[t]``, an item patch the mean of
its title's rows, a session patch the mean of its members' item patches. Labels are listed as (row, token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchrec.data.dataset import HISTORY_PLACEHOLDER, Samples
from patchrec.plan import DROP, ITEM, SESSION, TEXT, Plan
from patchrec.tokens import END_SEQ, ITEM_SEP, START_SEQ, end_of_turn_token, render_prompt_text


@dataclass
class ReferenceSequence:
    rows: torch.Tensor  # [rows, D] fp32
    label_rows: list[int]
    label_ids: list[int]
    hist_tokens_before: int
    hist_tokens_after: int


class ReferencePacker:
    """Builds reference sequences for one tokenizer (markers already added) and one embedding table.

    Tokenizer outputs are memoised by text only to keep tests fast; nothing else is shared between samples.
    """

    def __init__(self, tokenizer, weight: torch.Tensor, eot_token: str | None = None):
        self.tokenizer = tokenizer
        self.weight = weight.float()
        self.start, self.sep, self.end = tokenizer.convert_tokens_to_ids([START_SEQ, ITEM_SEP, END_SEQ])
        self.eot = tokenizer.convert_tokens_to_ids(eot_token or end_of_turn_token(tokenizer))
        self._memo: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._memo:
            self._memo[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._memo[text]

    def sequence(self, samples: Samples, i: int, plan: Plan) -> ReferenceSequence:
        """Rows of sample ``i`` of ``samples`` under ``plan``."""
        dataset, weight = samples.dataset, self.weight
        text = render_prompt_text(self.tokenizer, dataset.system_prompt, dataset.user_prompt)
        prefix_text, suffix_text = text.split(HISTORY_PLACEHOLDER)
        history = [int(x) for x in samples.history(i)]
        if len(plan) != len(history):
            raise ValueError(f"plan has {len(plan)} items, sample {i} has {len(history)}")

        rows: list[torch.Tensor] = [weight[t] for t in self.ids(prefix_text)]
        rows.append(weight[self.start])
        # Pieces in order: (kind, [item, ...], group); a session collects consecutive items of one group.
        pieces: list[tuple[int, list[int], int]] = []
        for item, kind, group in zip(history, plan.kinds.tolist(), plan.group.tolist(), strict=True):
            if kind == DROP:
                continue
            if kind == SESSION and pieces and pieces[-1][0] == SESSION and pieces[-1][2] == group:
                pieces[-1][1].append(item)
            else:
                pieces.append((kind, [item], group))
        before = sum(len(self.ids(dataset.titles[item])) for item in history)
        after = 0
        for k, (kind, members, _) in enumerate(pieces):
            if k:
                rows.append(weight[self.sep])
            title_ids = [self.ids(dataset.titles[item]) for item in members]
            if kind == TEXT:
                rows.extend(weight[t] for t in title_ids[0])
                after += len(title_ids[0])
            elif kind in (ITEM, SESSION):
                patches = [torch.stack([weight[t] for t in ids]).mean(0) for ids in title_ids]
                rows.append(torch.stack(patches).mean(0))
                after += 1
            else:
                raise ValueError(f"unknown kind {kind}")
        rows.append(weight[self.end])
        rows.extend(weight[t] for t in self.ids(suffix_text))
        answer = self.ids(dataset.titles[samples.target(i)])
        # The eot token is a label only: its row would predict nothing, so it is not an input.
        rows.extend(weight[t] for t in answer)
        first = len(rows) - len(answer) - 1
        return ReferenceSequence(
            torch.stack(rows), list(range(first, first + len(answer) + 1)), answer + [self.eot], before, after
        )
