"""The N learnable query vectors appended after the prompt (DESIGN.md section 1: an nn.Parameter fed through
`inputs_embeds`, not new vocabulary rows, so the frozen embedding table is never touched)."""

from __future__ import annotations

import torch
from torch import nn


class MetaQueries(nn.Module):
    def __init__(self, *, num_queries: int, width: int, init_std: float = 0.02) -> None:
        super().__init__()
        if num_queries < 1 or width < 1:
            raise ValueError(f"num_queries and width must be positive, got {num_queries} and {width}")
        self.queries = nn.Parameter(torch.randn(num_queries, width) * init_std)  # (N, D)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    @property
    def width(self) -> int:
        return self.queries.shape[1]

    def forward(self) -> torch.Tensor:
        return self.queries  # (N, D)
