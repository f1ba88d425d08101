"""A small character-level GPT and the corpus it trains on: this repository's own Python sources,
so the examples need no download."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
VOCAB = 128  # ASCII; anything else maps to 0


def corpus() -> torch.Tensor:
    """The package's source files, concatenated in name order, as ASCII codes."""
    text = "".join(path.read_text(encoding="utf-8") for path in sorted((REPO / "lightning_zero").rglob("*.py")))
    return torch.tensor([min(ord(ch), VOCAB - 1) for ch in text], dtype=torch.long)


def sample_batch(data: torch.Tensor, batch_size: int, block: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - block - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + block] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + block + 1] for s in starts.tolist()])
    return x, y


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer; the output projection shares the token embedding."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, block: int = 64) -> None:
        super().__init__()
        self.block = block
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(block, width)
        self.layers = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(length, device=idx.device))
        mask = torch.triu(torch.full((length, length), float("-inf"), device=idx.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(self.norm(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
