"""A tiny GPT (byte-level, about 0.1M parameters) and its bundled corpus, for the demo, the distributed
entry point and the tests. Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ["TinyGPT", "TinyGPTConfig", "LMOutput", "corpus_bytes", "random_batches"]


@dataclass
class TinyGPTConfig:
    vocab_size: int = 256  # bytes
    context: int = 64
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None


class _Block(torch.nn.Module):
    def __init__(self, cfg: TinyGPTConfig):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(cfg.d_model)
        self.attn = torch.nn.MultiheadAttention(cfg.d_model, cfg.n_head, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(cfg.d_model)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(cfg.d_model, 4 * cfg.d_model), torch.nn.GELU(),
                                       torch.nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TinyGPT(torch.nn.Module):
    """A causal transformer over bytes. ``model(input_ids, labels=None)`` returns :class:`LMOutput`
    (with ``loss`` when ``labels`` are given, the Hugging Face convention)."""

    def __init__(self, cfg: Optional[TinyGPTConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or TinyGPTConfig()
        self.wte = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = torch.nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = torch.nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = torch.nn.LayerNorm(cfg.d_model)
        self.head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> LMOutput:
        t = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))
        mask = torch.full((t, t), float("-inf"), device=input_ids.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return LMOutput(logits, loss)


def corpus_bytes() -> torch.Tensor:
    """The bundled corpus as a uint8 tensor of bytes."""
    data = (Path(__file__).parent / "data" / "corpus.txt").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_batches(batch_size: int, context: int, seed: int = 0, device="cpu",
                   rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Endless ``{"input_ids", "labels"}`` batches of random windows of the corpus. With ``world_size``
    > 1 every rank draws the same global batch and keeps its own contiguous slice of it."""
    data = corpus_bytes()
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=gen)
        window = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        per_rank = batch_size // world_size
        window = window[rank * per_rank : (rank + 1) * per_rank]
        yield {"input_ids": window[:, :-1].to(device), "labels": window[:, 1:].to(device)}
