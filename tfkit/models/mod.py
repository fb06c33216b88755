"""Mixture-of-Depths: blocks that process only the top-k tokens a learned router picks.

Raposo, Ritter, Richards, Lillicrap, Humphreys, Santoro, "Mixture-of-Depths: Dynamically
allocating compute in transformer-based language models", arXiv 2404.02258.

Every ``every``-th block (block i with ``(i + 1) % every == 0``) is *routed*; the others are
plain llama blocks. In a routed block, with x (B, T, d):

1. ``r = x w_r`` (B, T), a bias-free scalar router computed in fp32.
2. ``S`` = the top ``k = max(1, floor(capacity * T))`` positions of r in each row, in time order.
3. ``delta = Block(x_S) - x_S`` on the gathered (B, k, d) sub-sequence, with the tokens' original
   RoPE positions; attention is causal among the selected tokens only.
4. ``x[S] += g(r_S) * delta``; every other row passes through bit-identical. The multiplier puts
   the router on the gradient path. The paper multiplies by the raw router weight ``r``; by
   default this module uses ``sigmoid(r)`` as the Dynamic-Transformers reimplementation does, for
   stability (``MixtureOfDepths.gate_mode`` picks ``"sigmoid"``, ``"raw"`` or ``"one"``).

Top-k over the sequence is not causal (a later token changes which earlier tokens are
processed), so each routed block also trains a causal predictor (the paper's §3.5 method (ii)):
a small MLP on stop-gradient x, BCE against the top-k choice. When decoding (inside
``model.decoding()`` or whenever a KV cache is given) routing is token by token: a token is
processed when the predictor's logit is > 0 (sigma > 0.5), capacity is not enforced, and the
layer's cache masks the keys of skipped tokens. A single-token step that no sequence of the
batch routes through a block skips that block entirely (the sampling speed-up).

Parameter names: everything llama has, unchanged (``embed.weight``, ``blocks.{i}.attn.wq.weight``,
``blocks.{i}.ffn.w1.weight``, ``norm.weight``, ``head.weight`` when untied), so a llama checkpoint
initialises the trunk by name; plus, for each routed block i, ``routers.{i}.weight`` (1, d) and
``predictors.{i}.fc1.weight`` (d/2, d), ``predictors.{i}.fc2.weight`` (1, d/2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfkit.config import ModelConfig, MoDConfig
from tfkit.models.base import LanguageModel, ModelOutput, cross_entropy
from tfkit.models.layers import (
    Block,
    KVCache,
    TokenRouter,
    routed_delta,
    scatter_add_tokens,
    topk_positions,
)

GATE_MODES = ("sigmoid", "raw", "one")
"""Multipliers of a routed block's update: ``sigmoid(r)`` (default), raw ``r`` (the paper), or 1."""


# ---------------------------------------------------------------------------------------------
# One routed block


def capacity_tokens(capacity: float, t: int) -> int:
    """k = max(1, floor(capacity * t)): tokens a routed block processes per sequence of t tokens.

    A 1e-9 slack keeps float products such as 0.29 * 100 from flooring one token short.
    """
    return max(1, math.floor(capacity * t + 1e-9))


def router_logits(router: nn.Linear, x: Tensor) -> Tensor:
    """The router's scalar score per token in fp32 (also under autocast).

    Shapes:
        x (B, T, d); router.weight (1, d) -> (B, T) fp32.
    """
    return (x.float() * router.weight[0].float()).sum(dim=-1)  # (B, T)


def gate_values(r: Tensor, mode: str) -> Tensor:
    """The multiplier of a routed block's update: sigmoid(r), r itself, or ones (see :data:`GATE_MODES`).

    Shapes:
        r (B, T) -> (B, T) fp32.
    """
    if mode == "sigmoid":
        return torch.sigmoid(r)  # (B, T)
    if mode == "raw":
        return r  # (B, T)
    return torch.ones_like(r)  # (B, T)


def route_topk(block: Block, router: nn.Linear, x: Tensor, cos: Tensor, sin: Tensor, capacity: float,
               gate_mode: str = "sigmoid", checkpointed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """A routed block in training mode: only the top-k tokens of each sequence go through ``block``.

    ``x_out = x`` except at the selected rows S, where ``x_out[S] = x[S] + g(r_S) * (Block(x_S) - x_S)``
    with ``Block`` run on the gathered sub-sequence at the tokens' original positions.

    Args:
        block: the routed layer's :class:`~tfkit.models.layers.Block`.
        router: ``nn.Linear(d, 1, bias=False)``.
        x: (B, T, d) block input.
        cos, sin: (T, D/2) RoPE tables of positions 0..T-1.
        capacity: share of tokens processed (k = :func:`capacity_tokens`).
        gate_mode: one of :data:`GATE_MODES`.
        checkpointed: recompute the block in backward (``torch.utils.checkpoint``, non-reentrant).

    Returns:
        (x_out (B, T, d), idx (B, k) int64 selected positions in time order, r (B, T) fp32 scores).
    """
    r = router_logits(router, x)  # (B, T)
    idx = topk_positions(r, capacity_tokens(capacity, x.shape[1]))  # (B, k)
    if checkpointed:
        delta, _ = checkpoint(routed_delta, block, x, cos, sin, idx, use_reentrant=False)  # (B, k, d)
    else:
        delta, _ = routed_delta(block, x, cos, sin, idx=idx)  # (B, k, d)
    gate = gate_values(r, gate_mode).gather(1, idx)  # (B, k)
    return scatter_add_tokens(x, idx, gate.unsqueeze(-1) * delta), idx, r  # (B, T, d), (B, k), (B, T)


def route_causal(block: Block, router: nn.Linear, predictor: TokenRouter, x: Tensor, cos: Tensor, sin: Tensor,
                 gate_mode: str = "sigmoid", cache: Optional[KVCache] = None) -> tuple[Tensor, Tensor]:
    """A routed block in decoding mode: each token decides alone (predictor logit > 0).

    ``x_out = x + keep * g(r) * delta``, where ``delta`` comes from ``block`` run on all T tokens with
    each query seeing only the keys of kept tokens (and kept cached positions). With a cache the
    layer's key mask records ``keep``; when T == 1 and no sequence of the batch keeps its token,
    the block is not run at all (one host sync): only the mask is written, so the position's
    unwritten K/V slot stays masked for every later query.

    Args:
        block, router: as in :func:`route_topk`.
        predictor: the layer's :class:`~tfkit.models.layers.TokenRouter`.
        x: (B, T, d) block input.
        cos, sin: (T, D/2) RoPE tables of the T positions (from ``cache.length`` with a cache).
        gate_mode: one of :data:`GATE_MODES`.
        cache: KV cache; the block's slot is ``block.attn.layer``.

    Returns:
        (x_out (B, T, d), keep (B, T) bool).
    """
    keep = predictor(x) > 0  # (B, T)
    if cache is not None and x.shape[1] == 1 and not bool(keep.any()):
        cache.update_mask(block.attn.layer, keep)  # (B, S)
        return x, keep
    delta, _ = routed_delta(block, x, cos, sin, keep=keep, cache=cache)  # (B, T, d)
    gate = gate_values(router_logits(router, x), gate_mode)  # (B, T)
    update = torch.where(keep.unsqueeze(-1), gate.unsqueeze(-1) * delta, 0.0)  # (B, T, d)
    return x + update.to(x.dtype), keep  # (B, T, d), (B, T)


# ---------------------------------------------------------------------------------------------
# Model


class MixtureOfDepths(LanguageModel):
    """Llama decoder whose every ``cfg.mod.every``-th block processes only a ``capacity`` share of tokens.

    Block i is routed when ``(i + 1) % every == 0`` (every=2: blocks 1, 3, ...). Each block is a
    :class:`~tfkit.models.layers.Block` at ``blocks.{i}``; a routed block i also owns
    ``routers.{i}`` (``nn.Linear(d, 1, bias=False)``) and ``predictors.{i}``
    (:class:`~tfkit.models.layers.TokenRouter`, d -> d/2 -> SiLU -> 1 on stop-gradient input).

    Modes:
        * outside decoding, without cache (training and evaluation): top-k routing
          (:func:`route_topk`); the predictors learn the top-k choice with BCE.
        * inside ``model.decoding()`` or with a cache: causal routing by the predictors
          (:func:`route_causal`); output is causal and cached decoding equals the full forward.

    Loss: ``ce + predictor_loss_weight * mean over routed layers of predictor BCE`` (top-k mode;
    in decoding mode there is no top-k target and the loss is ``ce``).

    Outputs: ``parts`` ``"ce"`` and ``"predictor_bce"`` (nats per token, top-k mode only);
    ``stats`` ``"processed"`` (mean over routed layers of the share of tokens a routed block
    processed: k/T in top-k mode, the share the predictor kept in decoding mode),
    ``"processed_l{i}"`` per routed layer, and ``"predictor_acc"`` (share of tokens whose
    predictor decision, logit > 0, agrees with the top-k choice; top-k mode only). With no routed
    layer, ``processed`` is 1 and ``predictor_bce`` 0.

    Shapes:
        ids (B, T) int64 -> logits (B, T, V).

    Init: as :class:`~tfkit.models.llama.Llama` (every Linear and Embedding ~ N(0, init_std),
    attention ``wo`` and FFN ``w2`` ~ N(0, init_std / sqrt(2 * n_layers)), norms 1); the routers
    and both predictor layers are Linear too, ~ N(0, init_std), so at init the router scores are
    near 0 and the sigmoid gate near 1/2.

    Attributes:
        gate_mode: multiplier of a routed update, one of :data:`GATE_MODES`: ``"sigmoid"``
            (default, sigmoid(r), Dynamic-Transformers), ``"raw"`` (r, as in the paper) or
            ``"one"`` (no multiplier: the router gets no gradient from the LM loss; with capacity 1
            the model then equals a llama with the same block weights).
        routed_layers: indices of the routed blocks.
        capacity, predictor_loss_weight: from ``cfg.mod``.

    Args:
        cfg: model shape; ``cfg.mod`` holds capacity, every, predictor_loss_weight (defaults of
            :class:`~tfkit.config.MoDConfig` when the section is absent).
        attention: ``"sdpa"``, ``"flash"`` or ``"eager"``. Routed blocks in decoding mode use the
            masked SDPA path whatever the backend.
        grad_checkpointing: recompute each block's work in backward while training.

    Raises:
        ValueError: ``cfg.vocab_size`` is None, the attention backend is unknown, or ``gate_mode``
            is set to an unknown value.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self._init_trunk(cfg, attention, grad_checkpointing)
        mod = cfg.mod or MoDConfig()
        self.capacity = mod.capacity
        self.predictor_loss_weight = mod.predictor_loss_weight
        self.routed_layers = [i for i in range(cfg.n_layers) if (i + 1) % mod.every == 0]
        self._gate_mode = "sigmoid"
        self.routers = nn.ModuleDict({str(i): nn.Linear(cfg.d_model, 1, bias=False) for i in self.routed_layers})
        self.predictors = nn.ModuleDict({str(i): TokenRouter(cfg.d_model) for i in self.routed_layers})
        self.reset_parameters()

    @property
    def gate_mode(self) -> str:
        """Multiplier of a routed block's update: ``"sigmoid"``, ``"raw"`` or ``"one"``."""
        return self._gate_mode

    @gate_mode.setter
    def gate_mode(self, mode: str) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"unknown gate_mode {mode!r}; choose one of {', '.join(GATE_MODES)}")
        self._gate_mode = mode

    def flops_per_token(self, context_length: Optional[int] = None) -> float:
        """Training FLOPs per token, averaged over the T tokens of a sequence (forward + backward).

        ``6 * (N_dense + c * N_routed_blocks + N_routers) + 4 * N_predictors
        + 12 * d * T * (L_dense + c**2 * L_routed)``, with ``c = k / T`` (k =
        ``max(1, floor(capacity * T))``, T defaults to ``context_length``):

        * N_dense: matmul weights of the dense blocks, the final norm and the head (counted even
          when tied), as in :meth:`LanguageModel.flops_per_token` (PaLM, arXiv 2204.02311).
        * a routed block runs on k of T tokens, so its weights count c times per token; its
          attention has k queries over at most k keys, ``12 d k`` per processed token, i.e.
          ``12 d T c**2`` per token on average.
        * routers run on every token (6 per weight); predictors see stop-gradient input, so
          their backward has no input-gradient matmul (4 per weight: forward + weight gradient).
        """
        cfg = self.config
        t = self.context_length if context_length is None else context_length
        c = capacity_tokens(self.capacity, t) / t
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.embed.weight.numel()
        routed = sum(p.numel() for i in self.routed_layers for p in self.blocks[i].parameters())
        predictors = sum(p.numel() for p in self.predictors.parameters())
        matmul = 6.0 * (n - predictors - (1.0 - c) * routed) + 4.0 * predictors
        n_routed = len(self.routed_layers)
        attention = 12.0 * cfg.d_model * t * ((cfg.n_layers - n_routed) + c * c * n_routed)
        return matmul + attention

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts, stats).

        Top-k routing outside decoding mode without cache, causal predictor routing otherwise
        (see the class docstring). ``loss`` = mean cross-entropy in nats/token over targets != -1
        (fp32) plus the weighted predictor BCE in top-k mode. With a cache, positions start at
        ``cache.length`` and the cache grows by T (routed layers mask the keys of skipped tokens).

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        b, t = ids.shape[0], ids.shape[-1]
        x, cos, sin = self._embed(ids, targets, cache)  # (B, T, d), (T, D/2) x 2
        causal = self.decode_mode or cache is not None
        ckpt = self._checkpointing(cache)
        stats: dict[str, Tensor] = {}
        bces: list[Tensor] = []
        accs: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            key = str(i)
            if key not in self.routers:
                x = self._block(block, x, cos, sin, cache, ckpt)  # (B, T, d)
                continue
            router, predictor = self.routers[key], self.predictors[key]
            if causal:
                x, keep = route_causal(block, router, predictor, x, cos, sin, self.gate_mode, cache)  # (B, T, d)
                stats[f"processed_l{i}"] = keep.float().mean().detach()
                continue
            guess = predictor(x)  # (B, T) fp32 logits, input detached
            x, idx, _ = route_topk(block, router, x, cos, sin, self.capacity, self.gate_mode, ckpt)  # (B, T, d)
            selected = torch.zeros(b, t, dtype=torch.bool, device=ids.device).scatter(1, idx, True)  # (B, T)
            bce, acc = predictor.loss_and_accuracy(guess, selected)
            bces.append(bce)
            accs.append(acc)
            stats[f"processed_l{i}"] = torch.full((), idx.shape[1] / t, device=ids.device)
        logits = self._logits(x, cache)  # (B, T, V)
        layer_stats = list(stats.values())
        stats["processed"] = torch.stack(layer_stats).mean() if layer_stats else torch.ones((), device=ids.device)
        if accs:
            stats["predictor_acc"] = torch.stack(accs).mean()
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        ce = cross_entropy(logits, targets)  # scalar, nats/token
        parts = {"ce": ce.detach()}
        if causal:
            return ModelOutput(logits=logits, loss=ce, parts=parts, stats=stats)
        bce = torch.stack(bces).mean() if bces else ce.new_zeros(())  # scalar, nats/token
        parts["predictor_bce"] = bce.detach()
        return ModelOutput(logits=logits, loss=ce + self.predictor_loss_weight * bce, parts=parts, stats=stats)
