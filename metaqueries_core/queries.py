"""The N learnable query vectors appended after the prompt (DESIGN.md section 1: an nn.Parameter fed through
`inputs_embeds`, not new vocabulary rows, so the frozen embedding table is never touched).

`lead_slots` learned vectors may go before them, whose states are not read out: the reference code puts its learned
`<begin_of_img>` token there, and its checkpoints import with one lead slot."""

from __future__ import annotations

import torch
from torch import nn


class MetaQueries(nn.Module):
    def __init__(self, *, num_queries: int, width: int, init_std: float = 0.02, lead_slots: int = 0) -> None:
        super().__init__()
        if num_queries < 1 or width < 1:
            raise ValueError(f"num_queries and width must be positive, got {num_queries} and {width}")
        if lead_slots < 0:
            raise ValueError(f"lead_slots must be >= 0, got {lead_slots}")
        self.queries = nn.Parameter(torch.randn(num_queries, width) * init_std)  # (N, D)
        self.lead = nn.Parameter(torch.randn(lead_slots, width) * init_std) if lead_slots else None  # (P, D)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    @property
    def width(self) -> int:
        return self.queries.shape[1]

    @property
    def lead_slots(self) -> int:
        return 0 if self.lead is None else self.lead.shape[0]

    def forward(self) -> torch.Tensor:
        """Every slot's input embedding, lead slots first: (P + N, D)."""
        return self.queries if self.lead is None else torch.cat([self.lead, self.queries])
