"""Llama-style decoder: the modern baseline every other tfkit variant is measured against.

Pre-norm blocks with RMSNorm, RoPE, grouped-query attention, SwiGLU/GeGLU and an optionally
tied output head (Touvron et al., "LLaMA", arXiv 2302.13971; CS336 spring 2025 TransformerLM).

Parameter names (safetensors checkpoint keys):
``embed.weight`` (V, d); per block i ``blocks.i.attn_norm.weight``,
``blocks.i.attn.{wq,wk,wv,wo}.weight``, ``blocks.i.attn.{q_norm,k_norm}.weight`` (qk_norm only),
``blocks.i.ffn_norm.weight``, ``blocks.i.ffn.{w1,w2,w3}.weight``; ``norm.weight``; and
``head.weight`` (V, d) only when the head is untied. With tied embeddings there is no head
module: the logits are ``x @ embed.weight.T``, so the state dict holds the shared matrix once
and a plain ``load_state_dict`` keeps it tied.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfkit.config import ModelConfig
from tfkit.models.base import LanguageModel, ModelOutput
from tfkit.models.layers import Block, KVCache, RMSNorm, RotaryEmbedding

RESIDUAL_PROJECTIONS = ("attn.wo.weight", "ffn.w2.weight")
"""Suffixes of the weights initialised with the scaled std ``init_std / sqrt(2 * n_layers)``."""


class Llama(LanguageModel):
    """Token embedding, ``n_layers`` pre-norm :class:`~tfkit.models.layers.Block`, final RMSNorm, head.

    Init (GPT-2, arXiv 2005.14165 §2.3 / nanoGPT): every Linear and Embedding weight
    ~ N(0, init_std); the residual output projections (attention ``wo``, FFN ``w2``)
    ~ N(0, init_std / sqrt(2 * n_layers)); norm gains 1.

    Args:
        cfg: model shape; ``cfg.vocab_size`` must be set (use :func:`tfkit.models.build_model`,
            which says how to fix it when it is not).
        attention: ``"sdpa"``, ``"flash"`` or ``"eager"`` (see :mod:`tfkit.models.layers`).
        grad_checkpointing: recompute each block in backward (``torch.utils.checkpoint``,
            non-reentrant) while training, trading compute for activation memory.

    Raises:
        ValueError: ``cfg.vocab_size`` is None or the attention backend is unknown.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("Llama needs cfg.vocab_size; set model.vocab_size or give a tokenizer")
        self.config = cfg
        self.context_length = cfg.context_length
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i, attention) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as described in the class docstring."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = any(f"{name}.weight".endswith(s) for s in RESIDUAL_PROJECTIONS)
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def output_weight(self) -> Tensor:
        """The (V, d) matrix the logits are computed with: ``embed.weight`` when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def new_cache(
        self,
        batch_size: int,
        max_len: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> KVCache:
        """An empty KV cache: per layer K, V of shape (batch_size, n_kv_heads, max_len, head_dim).

        Args:
            batch_size: sequences decoded together.
            max_len: positions the cache holds (tokens); default ``context_length``.
            device: default the embedding's device.
            dtype: default the autocast dtype when autocast is on for that device, else the
                embedding's dtype.

        Raises:
            ValueError: a size is not positive.
        """
        w = self.embed.weight
        device = torch.device(device) if device is not None else w.device
        if dtype is None:
            on = torch.is_autocast_enabled(device.type) if device.type in ("cuda", "cpu") else False
            dtype = torch.get_autocast_dtype(device.type) if on else w.dtype
        cfg = self.config
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, max_len or self.context_length, cfg.head_dim, device, dtype)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts={"ce"}).

        ``loss`` = mean cross-entropy in nats/token over targets != -1, computed in fp32 from the
        logits (NaN when every target is -1). With a cache, positions start at ``cache.length``
        and the cache grows by T. Positions past ``context_length`` extrapolate RoPE.

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        b, t = ids.shape
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != ids shape {tuple(ids.shape)}")
        start = 0
        if cache is not None:
            cache.check_room(b, t)
            start = cache.length
        cos, sin = self.rope(start, t)  # (T, D/2) each
        x = self.embed(ids)  # (B, T, d)
        ckpt = self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)  # (B, T, d)
            else:
                x = block(x, cos, sin, cache)  # (B, T, d)
        if cache is not None:
            cache.advance(t)
        x = self.norm(x)  # (B, T, d)
        logits = F.linear(x, self.output_weight)  # (B, T, V)
        if targets is None:
            return ModelOutput(logits=logits)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)  # scalar, nats/token
        return ModelOutput(logits=logits, loss=ce, parts={"ce": ce.detach()})
