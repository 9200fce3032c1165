"""GRU4Rec (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks", ICLR 2016).

Item embedding -> GRU layer(s) -> dropout -> a linear output over the whole catalog. Differences from the
paper, on purpose and as in the later GRU4Rec versions and RecBole: an embedding instead of one-hot input,
full-catalog cross-entropy (the 2018 follow-up's best loss) instead of sampled BPR/TOP1, Adam instead of
Adagrad (with a large rate too: 5e-3 by default in ``patchrec baseline``; 1e-3 stalled on ML-100K), and a
user's whole (truncated) sequence instead of session-parallel mini-batches.

Takes the same packed input as SASRec (``items`` back to back, ``cu_seqlens`` offsets); internally it
uses ``pack_padded_sequence`` so the GRU never steps over padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass
class GRU4RecConfig:
    embedding: int = 64  # item embedding size (the paper fed one-hot vectors; an embedding is standard now)
    hidden: int = 100  # GRU units (paper: 100 on its session datasets)
    num_layers: int = 1  # stacked GRU layers (paper: one layer was best)
    dropout: float = 0.25  # on the embeddings and the GRU output (paper tuned 0-0.5)


class GRU4Rec(nn.Module):
    def __init__(self, num_items: int, config: GRU4RecConfig | None = None) -> None:
        super().__init__()
        config = config or GRU4RecConfig()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if config.embedding < 1 or config.hidden < 1 or config.num_layers < 1:
            raise ValueError("config.embedding, config.hidden and config.num_layers must be >= 1")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"config.dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items, config.embedding)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.embedding,
            config.hidden,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.output = nn.Linear(config.hidden, num_items)
        nn.init.xavier_normal_(self.item_emb.weight)

    def forward(self, items: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Hidden states [T, hidden] of packed sequences (same convention as ``SASRec.forward``)."""
        if items.ndim != 1:
            raise ValueError(f"items must be 1-D [T], got shape {tuple(items.shape)}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or int(cu_seqlens[-1]) != items.numel():
            raise ValueError("cu_seqlens must be 1-D [B+1] ending at len(items)")
        cu = cu_seqlens.to(device=items.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        if int(lengths.min()) < 1:
            raise ValueError("every sequence in cu_seqlens must hold at least one item")
        num_seqs, total = len(lengths), items.numel()
        # scatter the packed tokens into a [B, max_len] grid only for the GRU call; pack_padded_sequence
        # then skips the padded slots, and the gather below drops them again
        seq_of = torch.repeat_interleave(
            torch.arange(num_seqs, device=items.device), lengths, output_size=total
        )
        pos = torch.arange(total, device=items.device) - cu[:-1][seq_of]
        x = self.dropout(self.item_emb(items))
        padded = x.new_zeros(num_seqs, max_seqlen, x.shape[-1])
        padded[seq_of, pos] = x
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_seqlen)
        return self.dropout(out[seq_of, pos])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item, [..., num_items]."""
        return self.output(hidden)
