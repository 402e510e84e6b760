"""``transformer``: text classifier over token ids, an exit after each encoder block.

Input: token ids ``[B, L]`` (long), 0 = padding. Block 0 = token embedding + learned
positions (``max_len`` = L from the input shape) + encoder layer 1; block k = encoder layer
k+1. Encoder layers are pre-LayerNorm (stable without warm-up, and every block output is
then a residual stream that a head can normalise itself). Padding tokens are masked as
attention keys and left out of the pooling. Blocks pass ``(hidden [B, L, d], keep [B, L])``
to each other and to the heads. Exit head: masked mean-pool -> LayerNorm -> Linear.

Attention is written as two explicit matmuls in :class:`AttentionCore` (not
``nn.MultiheadAttention``, whose fused CPU fast path hides its cost and does not vmap), so
its MACs are countable by a forward hook and by ``FlopCounterMode`` alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import EarlyExitNet
from .options import check_input_shape, require

PAD_ID = 0
State = tuple[Tensor, Tensor]  # (hidden [B, L, d], keep mask [B, L] bool)


@dataclass(frozen=True)
class TransformerOptions:
    """Options of the ``transformer`` family (``vocab_size`` is required)."""

    vocab_size: int | None = None  # token ids are in [0, vocab_size), 0 = padding
    d_model: int = 128
    heads: int = 4
    ff: int = 256
    layers: int = 4  # number of encoder blocks = number of exits
    dropout: float = 0.1

    def __post_init__(self) -> None:
        require(self.vocab_size is not None and self.vocab_size >= 2, "vocab_size",
                "an integer >= 2 (required for the transformer)", self.vocab_size)
        for name in ("d_model", "heads", "ff", "layers"):
            require(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        require(self.d_model % self.heads == 0, "d_model",
                f"a multiple of heads={self.heads}", self.d_model)
        require(0.0 <= self.dropout < 1.0, "dropout", "a float in [0, 1)", self.dropout)


class Embed(nn.Module):
    """Token embedding + learned positions; returns the hidden state and the keep mask."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.positions = nn.Parameter(torch.zeros(1, max_len, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> State:
        length = ids.shape[-1]
        if length > self.positions.shape[1]:
            raise ValueError(f"sequence length {length} exceeds max_len {self.positions.shape[1]}")
        hidden = self.tokens(ids) + self.positions[:, :length]
        return self.drop(hidden), ids != PAD_ID


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d_head), padding keys masked) v for ``[B, H, L, d_head]`` inputs."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        # finfo.min rather than -inf: an all-padding row then gives uniform weights, not NaN.
        scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
        return self.drop(scores.softmax(dim=-1)) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused q/k/v projection, core, output projection."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.core = AttentionCore(dropout)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = (self.qkv(x).view(b, length, 3, self.heads, d // self.heads)
                   .permute(2, 0, 3, 1, 4).unbind(0))
        out = self.core(q, k, v, keep)  # [B, H, L, d_head]
        return self.proj(out.transpose(1, 2).reshape(b, length, d))


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer: x + Attn(LN(x)), then x + FF(LN(x))."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, state: State) -> State:
        x, keep = state
        x = x + self.drop(self.attn(self.norm1(x), keep))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x, keep


class MeanPoolHead(nn.Module):
    """Exit head: mean over non-padding positions -> LayerNorm -> Linear."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, state: State) -> Tensor:
        x, keep = state
        weight = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)
        return self.fc(self.norm(pooled))


def _init_weights(module: nn.Module) -> None:
    # BERT-style N(0, 0.02) for projections and embeddings; the padding row stays zero.
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            with torch.no_grad():
                m.weight[PAD_ID].zero_()
        elif isinstance(m, Embed):
            nn.init.normal_(m.positions, std=0.02)


def build_transformer(input_shape: tuple[int, ...], num_classes: int,
                      opts: TransformerOptions) -> EarlyExitNet:
    """Transformer early-exit classifier for token ids of shape ``(L,)``."""
    check_input_shape("transformer", input_shape, 1, "(sequence_length,)")
    assert opts.vocab_size is not None  # checked by TransformerOptions
    (max_len,) = input_shape
    blocks: list[nn.Module] = []
    for k in range(opts.layers):
        layer = EncoderLayer(opts.d_model, opts.heads, opts.ff, opts.dropout)
        if k == 0:
            layer = nn.Sequential(Embed(opts.vocab_size, max_len, opts.d_model, opts.dropout),
                                  layer)
        blocks.append(layer)
    heads = [MeanPoolHead(opts.d_model, num_classes) for _ in range(opts.layers)]
    net = EarlyExitNet(blocks, heads, arch="transformer", input_shape=input_shape,
                       num_classes=num_classes, input_dtype=torch.long)
    _init_weights(net)
    return net
