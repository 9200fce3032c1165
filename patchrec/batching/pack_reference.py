"""The slow, obvious materialisation of one sample's input rows, to check ``patchrec.batching.pack`` against.

Per sample and plan it calls the tokenizer on each title and on the two prompt halves (no CSR table, no
vectorisation) and builds a Python list of embedding rows: a text token is ``E[t]``, an item patch the mean of
its title's rows, a session patch the mean of its members' item patches. Labels are listed as (row, token).
``persrec_sequence`` writes a PerSRec prompt out the same way, with each row's role for
``patchrec.persrec.reference.persrec_mask`` (``patchrec.batching.row_roles``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patchrec.batching import row_roles as roles
from patchrec.batching.plan import DROP, ITEM, SESSION, TEXT, Plan
from patchrec.batching.tokens import END_SEQ, ITEM_SEP, START_SEQ, end_of_turn_token, render_prompt_text
from patchrec.data.dataset import HISTORY_PLACEHOLDER, Samples


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

    def persrec_sequence(
        self, samples: Samples, i: int, segment: int, token_ids: list[int], old: str = "item",
        window: tuple[int, int] | None = None,
    ) -> tuple[ReferenceSequence, list[int], list[int]]:  # fmt: skip
        """Rows of sample ``i`` under PerSRec and each row's (kind, segment) role.

        ``[prefix <|start_seq|>]`` (PREFIX), then each full segment of ``segment`` items from the oldest: its
        items (item patches or text) each followed by ``<|item_sep|>``, then the T rows ``token_ids``
        (ITEM / TOKEN rows of that segment); then the last 1..segment items as text with separators between
        them, ``<|end_seq|>``, the prompt suffix and the answer (RECENT). ``window`` = (P, R): the window
        layout instead, one old segment of the items before the newest R (the T rows right after
        ``<|start_seq|>`` when there are none)."""
        dataset, weight = samples.dataset, self.weight
        text = render_prompt_text(self.tokenizer, dataset.system_prompt, dataset.user_prompt)
        prefix_text, suffix_text = text.split(HISTORY_PLACEHOLDER)
        history = [int(x) for x in samples.history(i)]
        rows: list[torch.Tensor] = []
        kind: list[int] = []
        seg: list[int] = []

        def add(row: torch.Tensor, k: int, s: int = -1) -> None:
            rows.append(row)
            kind.append(k)
            seg.append(s)

        for t in self.ids(prefix_text) + [self.start]:
            add(weight[t], roles.PREFIX)
        if window is None:
            num_old = (len(history) - 1) // segment * segment
        else:
            num_old = len(history) - min(len(history), window[1])
            segment = max(num_old, 1)  # one old segment closing after the last old item
            if num_old == 0:
                for t in token_ids:
                    add(weight[t], roles.TOKEN, 0)
        for j, item in enumerate(history):
            ids = self.ids(dataset.titles[item])
            if j < num_old:
                s = j // segment
                if old == "item":
                    add(torch.stack([weight[t] for t in ids]).mean(0), roles.ITEM, s)
                else:
                    for t in ids:
                        add(weight[t], roles.ITEM, s)
                add(weight[self.sep], roles.ITEM, s)
                if (j + 1) % segment == 0:
                    for t in token_ids:
                        add(weight[t], roles.TOKEN, s)
            else:
                for t in ids:
                    add(weight[t], roles.RECENT)
                if j + 1 < len(history):
                    add(weight[self.sep], roles.RECENT)
        for t in [self.end] + self.ids(suffix_text):
            add(weight[t], roles.RECENT)
        answer = self.ids(dataset.titles[samples.target(i)])
        for t in answer:
            add(weight[t], roles.RECENT)
        first = len(rows) - len(answer) - 1
        before = sum(len(self.ids(dataset.titles[item])) for item in history)
        sequence = ReferenceSequence(torch.stack(rows), list(range(first, first + len(answer) + 1)),
                                     answer + [self.eot], before, -1)  # fmt: skip
        return sequence, kind, seg

    def rolling_sequences(
        self, samples: Samples, i: int, segment: int, token_ids: list[int], old: str = "item"
    ) -> tuple[list[torch.Tensor], ReferenceSequence, int]:
        """PerSRec's rolling layout for sample ``i`` written out: (the rows of each folded segment as its own
        sequence ``[T ids as memory placeholders][items, each followed by <|item_sep|>][T ids]``, the final
        prompt ``[prefix <|start_seq|>][T ids as memory placeholders][open items][<|end_seq|> suffix]
        [answer]``, the first memory row of the final prompt). The memory rows are to be overwritten."""
        dataset, weight = samples.dataset, self.weight
        text = render_prompt_text(self.tokenizer, dataset.system_prompt, dataset.user_prompt)
        prefix_text, suffix_text = text.split(HISTORY_PLACEHOLDER)
        history = [int(x) for x in samples.history(i)]
        folded = (len(history) - 1) // segment * segment
        tokens = [weight[t] for t in token_ids]
        folds = []
        for start in range(0, folded, segment):
            rows = list(tokens)
            for item in history[start : start + segment]:
                ids = self.ids(dataset.titles[item])
                if old == "item":
                    rows.append(torch.stack([weight[t] for t in ids]).mean(0))
                else:
                    rows.extend(weight[t] for t in ids)
                rows.append(weight[self.sep])
            folds.append(torch.stack(rows + tokens))
        rows = [weight[t] for t in self.ids(prefix_text) + [self.start]]
        memory_row = len(rows)
        rows.extend(tokens)
        for j, item in enumerate(history[folded:]):
            if j:
                rows.append(weight[self.sep])
            rows.extend(weight[t] for t in self.ids(dataset.titles[item]))
        rows.extend(weight[t] for t in [self.end] + self.ids(suffix_text))
        answer = self.ids(dataset.titles[samples.target(i)])
        rows.extend(weight[t] for t in answer)
        first = len(rows) - len(answer) - 1
        before = sum(len(self.ids(dataset.titles[item])) for item in history)
        final = ReferenceSequence(torch.stack(rows), list(range(first, first + len(answer) + 1)),
                                  answer + [self.eot], before, -1)  # fmt: skip
        return folds, final, memory_row
