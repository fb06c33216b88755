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

from typing import Optional

from torch import Tensor

from tfkit.config import ModelConfig
from tfkit.models.base import LanguageModel, ModelOutput, cross_entropy
from tfkit.models.layers import KVCache


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
        self._init_trunk(cfg, attention, grad_checkpointing)
        self.reset_parameters()

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts={"ce"}).

        ``loss`` = mean cross-entropy in nats/token over targets != -1, computed in fp32 from the
        logits (0 when every target is -1). With a cache, positions start at ``cache.length``
        and the cache grows by T. Positions past ``context_length`` extrapolate RoPE.

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        x, cos, sin = self._embed(ids, targets, cache)  # (B, T, d), (T, D/2) x 2
        ckpt = self._checkpointing(cache)
        for block in self.blocks:
            x = self._block(block, x, cos, sin, cache, ckpt)  # (B, T, d)
        logits = self._logits(x, cache)  # (B, T, V)
        if targets is None:
            return ModelOutput(logits=logits)
        ce = cross_entropy(logits, targets)  # scalar, nats/token
        return ModelOutput(logits=logits, loss=ce, parts={"ce": ce.detach()})
