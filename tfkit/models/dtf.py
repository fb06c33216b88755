"""DTF: Dynamic Transformer with surprise-based routing (Wieser et al., arXiv 2511.21408).

The paper calls it SDT ("Subjective Depth Transformer"); the equations here are those of the MSc
thesis (eqs. 3.1-3.13, ``fredericowieser/Dynamic-Transformers`` ``docs/DTF-Report.md``), inspired
by Variational Predictive Routing. Layers come in pairs ``p = 0 .. n_layers/2 - 1``:

* the *decision* block ``blocks.{2p}`` (Block_A, dense) computes the posterior
  ``H_post = Block_A(H)``, and a cheap prior FFN predicts it: ``H_prior = H + PriorFFN(RMSNorm(H))``;
* two surprises per token, in fp32 (B, T):
  ``D_st = mean_d (H_post - H)^2`` (static: "nothing changes" was wrong by this much) and
  ``D_ch = mean_d (H_post - H_prior)^2`` (change: the prior's error), both on stop-gradient
  states. This and the next stop-gradient are tfkit's choices, not the thesis's: the gate's
  scalars still learn through G, but the LM loss cannot open the gate by inflating Block_A's
  update, and the prior loss trains the prior FFN only (its input H is detached too). With
  gradients through either, from-scratch training at lr 2e-3 pulled H toward H + Block_A(H), a
  target that moves away as H grows: the residual stream blew up (prior loss 5e6-8e6, val bpb
  3.4-3.7 against llama's 2.35 in 3 minutes);
* expected event ``CE = D_st - D_ch + log(o_ce + 1e-10)`` (the prior explains the change better
  than "no change") and unexpected event ``CU = D_st - m_cu * MA_W(stopgrad D_st)`` (a change
  larger than the causal trailing mean of the last W changes);
* gate ``G = S_CE OR S_CU = S_CE + S_CU - S_CE*S_CU`` with ``S_CE = sigmoid(softplus(beta_ce)*CE)``,
  ``S_CU = sigmoid(softplus(beta_cu)*CU)``;
* the *dynamic* block ``blocks.{2p+1}`` (Block_B) processes only the top ``k = max(1, int(gamma*T))``
  tokens of G per sequence (attending causally among them, at their original RoPE positions):
  ``H_out[i] = H_post[i] + G_i * delta_B(H_post[S])_i`` for i in S, ``H_out[i] = H_post[i]`` otherwise,
  where ``delta_B(x) = Block_B(x) - x`` is the block's residual update.

Top-k over the sequence is not causal. For generation (``model.decoding()`` or a KV cache) each
pair's causal :class:`~tfkit.models.layers.TokenRouter` (trained by BCE to predict the top-k choice)
decides token by token: ``keep = router(H_post) > 0``, ``H_out = H_post + (keep*G) * delta_B``, where
Block_B's queries see only the keys of kept tokens. The moving average is causal already; with a
cache each pair keeps its D_st history in ``cache.extra["dtf_dst_{p}"]`` so cached decoding equals
the full forward.

Loss: ``CE_LM + prior_loss_weight * mean_p MSE(H_prior, stopgrad H_post)
+ router_loss_weight * mean_p BCE(router logits, 1[token in top-k])`` (the router term only in
top-k mode, where the top-k choice exists).

Parameter names (safetensors keys): the llama names for everything llama has (``embed.weight``,
``blocks.{i}.attn_norm.weight``, ``blocks.{i}.attn.{wq,wk,wv,wo}.weight``,
``blocks.{i}.ffn_norm.weight``, ``blocks.{i}.ffn.{w1,w2,w3}.weight``, ``norm.weight``,
``head.weight`` when untied), so a llama checkpoint initialises a DTF model by name; and per pair p
``priors.{p}.norm.weight``, ``priors.{p}.ffn.{w1,w2,w3}.weight`` (the prior FFN),
``gates.{p}.{beta_ce,beta_cu,o_ce,m_cu}`` (0-dim scalars) and ``routers.{p}.fc1.weight``,
``routers.{p}.fc2.weight`` (the causal router).

Config fields (``model.dtf``): ``capacity_gamma``, ``beta_ce_init``, ``beta_cu_init``,
``cu_detection_multiplier_init`` (m_cu), ``ce_criterion_offset_init`` (o_ce),
``prior_ffn_intermediate_size_factor``, ``prior_loss_weight``, ``ma_window`` (W),
``router_loss_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfkit.config import DTFConfig, ModelConfig
from tfkit.models.base import LanguageModel, ModelOutput, cross_entropy
from tfkit.models.layers import (
    Block,
    FeedForward,
    KVCache,
    RMSNorm,
    TokenRouter,
    gather_tokens,
    routed_delta,
    scatter_add_tokens,
    topk_positions,
)

PRIOR_INIT_STD = 0.02
"""Std of every prior FFN weight (thesis: N(0, 0.02^2)), independent of ``init_std``."""

LOG_EPS = 1e-10
"""Guard of the expected-event offset: ``log(max(o_ce, 1e-10) + 1e-10)``."""


def history_key(pair: int) -> str:
    """Key of pair ``pair``'s D_st history (B, max_len) fp32 in ``KVCache.extra``."""
    return f"dtf_dst_{pair}"


# ---------------------------------------------------------------------------------------------
# Surprise pieces


def prior_width(d_model: int, factor: float) -> int:
    """Hidden width d_i of the prior FFN: ``ceil(d_model * factor)`` rounded up to even, at least 2."""
    width = math.ceil(d_model * factor)
    width += width % 2
    return max(2, width)


def moving_average(x: Tensor, window: int, out_len: Optional[int] = None) -> Tensor:
    """Causal trailing mean over ``window`` positions, left-padded by repeating position 0.

    ``MA[t] = mean(x[t-W+1], ..., x[t])`` where positions below 0 read ``x[0]``, so the mean of a
    constant sequence is that constant and ``MA[t]`` depends on ``x[<= t]`` only. With ``out_len``
    only the last ``out_len`` positions are computed (cached decoding: ``x`` is the history plus
    the new values).

    Shapes:
        x (B, N) -> (B, out_len) (default out_len = N), same dtype as x.
    """
    n = x.shape[-1]
    out_len = n if out_len is None else out_len
    first = n - out_len - (window - 1)  # first position any output reads; < 0 means padding
    seg = x[:, max(first, 0):]  # (B, <= out_len + W - 1)
    if first < 0:
        seg = torch.cat([x[:, :1].expand(-1, -first), seg], dim=1)  # (B, out_len + W - 1)
    return F.avg_pool1d(seg.unsqueeze(1), window, stride=1).squeeze(1)  # (B, out_len)


class PriorFFN(nn.Module):
    """The prior's update ``FFN(RMSNorm(x))``; the prior state is ``x + PriorFFN(x)``.

    A bias-free SwiGLU of hidden width ``prior_width(d, factor)`` (thesis eq. 3.3). Init: every
    weight ~ N(0, 0.02^2), norm gain 1 (done by the model's ``reset_parameters``).

    Parameters: ``norm.weight`` (d,), ``ffn.w1.weight``/``ffn.w3.weight`` (d_i, d), ``ffn.w2.weight`` (d, d_i).

    Shapes:
        x (B, T, d) -> (B, T, d).
    """

    def __init__(self, d_model: int, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.ffn = FeedForward(d_model, hidden, "swiglu")

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.norm(x))  # (B, T, d)


@dataclass
class GateOutput:
    """The surprise criteria of a pair, each (B, T) fp32."""

    ce: Tensor
    cu: Tensor
    s_ce: Tensor
    s_cu: Tensor
    g: Tensor


class SurpriseGate(nn.Module):
    """The four learned scalars of a pair and the gate ``G = S_CE OR S_CU`` (thesis eqs. 3.6-3.10).

    ``CE = D_st - D_ch + log(max(o_ce, 1e-10) + 1e-10)``, ``CU = D_st - m_cu * MA``,
    ``S_CE = sigmoid(softplus(beta_ce) * CE)``, ``S_CU = sigmoid(softplus(beta_cu) * CU)``,
    ``G = S_CE + S_CU - S_CE*S_CU``, evaluated as ``hi + lo*(1 - hi)`` with hi/lo the larger/smaller
    of the two (the same value, but in floating point G >= max(S_CE, S_CU) and G <= 1 hold exactly).

    Parameters (0-dim, fp32): ``beta_ce``, ``beta_cu`` (temperatures before softplus), ``o_ce``
    (ce_criterion_offset), ``m_cu`` (cu_detection_multiplier), initialised from ``cfg``.

    Shapes:
        d_st, d_ch, ma (B, T) -> :class:`GateOutput` of (B, T) fp32 tensors.
    """

    def __init__(self, cfg: DTFConfig) -> None:
        super().__init__()
        self.inits = (cfg.beta_ce_init, cfg.beta_cu_init, cfg.ce_criterion_offset_init, cfg.cu_detection_multiplier_init)
        self.beta_ce = nn.Parameter(torch.tensor(float(cfg.beta_ce_init)))
        self.beta_cu = nn.Parameter(torch.tensor(float(cfg.beta_cu_init)))
        self.o_ce = nn.Parameter(torch.tensor(float(cfg.ce_criterion_offset_init)))
        self.m_cu = nn.Parameter(torch.tensor(float(cfg.cu_detection_multiplier_init)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Set the four scalars back to their configured initial values."""
        for p, v in zip((self.beta_ce, self.beta_cu, self.o_ce, self.m_cu), self.inits):
            p.fill_(v)

    def forward(self, d_st: Tensor, d_ch: Tensor, ma: Tensor) -> GateOutput:
        ce = d_st - d_ch + torch.log(self.o_ce.float().clamp_min(LOG_EPS) + LOG_EPS)  # (B, T)
        cu = d_st - self.m_cu.float() * ma  # (B, T)
        s_ce = torch.sigmoid(F.softplus(self.beta_ce.float()) * ce)  # (B, T)
        s_cu = torch.sigmoid(F.softplus(self.beta_cu.float()) * cu)  # (B, T)
        hi, lo = torch.maximum(s_ce, s_cu), torch.minimum(s_ce, s_cu)  # (B, T) each
        return GateOutput(ce, cu, s_ce, s_cu, hi + lo * (1.0 - hi))


# ---------------------------------------------------------------------------------------------
# One decision/dynamic pair


@dataclass
class PairOutput:
    """What one pair computes. Tensors (B, T, d) in the activation dtype, (B, T) in fp32 unless noted.

    Attributes:
        h: H_out, the pair's output (B, T, d).
        h_post: Block_A's output (B, T, d).
        h_prior: the prior's prediction of it (B, T, d).
        d_st, d_ch, ma: static surprise, change surprise, moving average of D_st (B, T).
        gate: CE, CU, S_CE, S_CU, G (B, T) each.
        routed: (B, T) bool, the tokens Block_B processed (top-k, or kept by the router).
        router_logits: (B, T) fp32 logits of the causal router.
        idx: (B, k) top-k positions in time order (top-k mode), else None.
        prior_loss: 0-dim MSE(H_prior, stopgrad H_post), fp32.
        router_bce, router_acc: 0-dim BCE of the router against ``routed`` and its accuracy
            (top-k mode only; None when routing causally).
    """

    h: Tensor
    h_post: Tensor
    h_prior: Tensor
    d_st: Tensor
    d_ch: Tensor
    ma: Tensor
    gate: GateOutput
    routed: Tensor
    router_logits: Tensor
    idx: Optional[Tensor]
    prior_loss: Tensor
    router_bce: Optional[Tensor]
    router_acc: Optional[Tensor]


def _run(fn, *args, ckpt: bool = False):
    """``fn(*args)``, recomputed in backward (non-reentrant activation checkpointing) when ``ckpt``."""
    return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)


def pair_forward(
    block_a: Block,
    block_b: Block,
    prior: PriorFFN,
    gate: SurpriseGate,
    router: TokenRouter,
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    gamma: float,
    ma_window: int,
    causal: bool = False,
    cache: Optional[KVCache] = None,
    key: Optional[str] = None,
    ckpt: bool = False,
) -> PairOutput:
    """One decision/dynamic pair of the Dynamic Transformer (module docstring for the equations).

    Args:
        block_a, block_b: the decision block (dense) and the dynamic block (routed).
        prior, gate, router: the pair's prior FFN, surprise gate and causal router.
        h: (B, T, d) the pair's input H.
        cos, sin: (T, D/2) RoPE tables of the T positions.
        gamma: capacity; top-k mode routes ``k = max(1, int(gamma * T))`` tokens per sequence.
        ma_window: W of the moving average.
        causal: route with the causal router (generation) instead of top-k of G.
        cache: KV cache to read and extend (implies causal routing); its ``extra[key]`` holds
            this pair's D_st history (created when missing).
        key: name of the D_st history in ``cache.extra`` (needed with a cache).
        ckpt: recompute each block in backward (activation checkpointing).

    Returns:
        :class:`PairOutput`.

    Raises:
        ValueError: a cache without ``key``.
    """
    b, t, _ = h.shape
    causal = causal or cache is not None
    h_post = _run(block_a, h, cos, sin, cache, ckpt=ckpt)  # (B, T, d)
    h_in = h.detach()  # the prior learns from its own loss only, below
    h_prior = h_in + prior(h_in)  # (B, T, d)
    # surprise is measured on stop-gradient states: the LM loss trains the gate's four scalars
    # through G but cannot open the gate by inflating Block_A's update
    hf, post, prior_h = h_in.float(), h_post.detach().float(), h_prior.detach().float()  # (B, T, d) each
    d_st = (post - hf).pow(2).mean(dim=-1)  # (B, T) fp32
    d_ch = (post - prior_h).pow(2).mean(dim=-1)  # (B, T) fp32
    if cache is not None:
        if key is None:
            raise ValueError("pair_forward with a cache needs `key`, the name of the D_st history in cache.extra")
        if key not in cache.extra:
            cache.extra[key] = torch.zeros(cache.batch_size, cache.max_len, device=h.device, dtype=torch.float32)
        history = cache.extra[key]  # (B, max_len) fp32
        history[:, cache.length : cache.length + t] = d_st.detach()
        ma = moving_average(history[:, : cache.length + t], ma_window, out_len=t)  # (B, T)
    else:
        ma = moving_average(d_st.detach(), ma_window)  # (B, T)
    gt = gate(d_st, d_ch, ma)  # (B, T) each
    g = gt.g  # (B, T) fp32
    logits = router(h_post)  # (B, T) fp32
    prior_loss = F.mse_loss(h_prior.float(), h_post.detach().float())  # scalar
    bce = acc = idx = None
    if causal:
        keep = logits > 0  # (B, T) bool
        if cache is not None and t == 1 and not bool(keep.any()):  # host sync: decoding only
            cache.update_mask(block_b.attn.layer, keep)  # this position holds no key in Block_B
            out = h_post  # (B, 1, d)
        else:
            delta, _ = _run(routed_delta, block_b, h_post, cos, sin, None, keep, cache, ckpt=ckpt)  # (B, T, d)
            out = h_post + ((keep.float() * g).unsqueeze(-1) * delta).to(h_post.dtype)  # (B, T, d)
        routed = keep
    else:
        k = max(1, int(gamma * t))
        idx = topk_positions(g.detach(), k)  # (B, k)
        delta, _ = _run(routed_delta, block_b, h_post, cos, sin, idx, ckpt=ckpt)  # (B, k, d)
        g_s = gather_tokens(g, idx)  # (B, k)
        out = scatter_add_tokens(h_post, idx, g_s.unsqueeze(-1) * delta)  # (B, T, d)
        routed = torch.zeros(b, t, dtype=torch.bool, device=h.device).scatter_(1, idx, True)  # (B, T)
        bce, acc = router.loss_and_accuracy(logits, routed)
    return PairOutput(out, h_post, h_prior, d_st, d_ch, ma, gt, routed, logits, idx, prior_loss, bce, acc)


# ---------------------------------------------------------------------------------------------
# The model


class DynamicTransformer(LanguageModel):
    """Token embedding, ``n_layers/2`` decision/dynamic pairs, final RMSNorm, head (arXiv 2511.21408).

    Shapes: ids (B, T) int64 -> logits (B, T, V). Blocks are llama's
    :class:`~tfkit.models.layers.Block` (``blocks.{2p}`` dense, ``blocks.{2p+1}`` routed); each
    pair adds ``priors.{p}`` (:class:`PriorFFN`), ``gates.{p}`` (:class:`SurpriseGate`) and
    ``routers.{p}`` (:class:`~tfkit.models.layers.TokenRouter`). :meth:`pair` runs one pair.

    Init: as Llama (every Linear and Embedding ~ N(0, init_std), attention ``wo`` and FFN ``w2`` of
    the blocks ~ N(0, init_std / sqrt(2 * n_layers)), norm gains 1; routers ~ N(0, init_std));
    prior FFN weights ~ N(0, 0.02^2); gate scalars at ``beta_ce_init``, ``beta_cu_init``,
    ``ce_criterion_offset_init``, ``cu_detection_multiplier_init``.

    Output: ``loss`` = CE + prior_loss_weight * prior_loss (+ router_loss_weight * router_bce in
    top-k mode). ``parts``: ``ce`` (nats/token), ``prior_loss`` (mean squared error per element,
    mean over pairs), ``router_bce`` (nats/token, mean over pairs; top-k mode only). ``stats``
    (means over pairs): ``ce_rate``/``cu_rate`` (share of tokens with S_CE/S_CU > 0.5),
    ``gate_mean`` (mean G), ``processed`` (share of tokens Block_B processed), ``router_acc``
    (share of tokens the causal router classifies as top-k does; top-k mode only).

    Args:
        cfg: model shape with ``arch="dtf"`` (its ``cfg.dtf`` section); ``vocab_size`` must be set.
        attention: ``"sdpa"``, ``"flash"`` or ``"eager"``.
        grad_checkpointing: recompute each block in backward while training.

    Raises:
        ValueError: ``cfg.vocab_size`` is None, ``cfg.dtf`` is missing, ``n_layers`` is odd, or
            the attention backend is unknown.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.dtf is None:
            raise ValueError("DynamicTransformer needs the model.dtf section; set model.arch=dtf")
        if cfg.n_layers % 2:
            raise ValueError(f"DynamicTransformer pairs its layers: n_layers={cfg.n_layers} must be even")
        self._init_trunk(cfg, attention, grad_checkpointing)
        self.dtf = cfg.dtf
        self.n_pairs = cfg.n_layers // 2
        d = cfg.d_model
        width = prior_width(d, cfg.dtf.prior_ffn_intermediate_size_factor)
        self.priors = nn.ModuleList(PriorFFN(d, width, cfg.norm_eps) for _ in range(self.n_pairs))
        self.gates = nn.ModuleList(SurpriseGate(cfg.dtf) for _ in range(self.n_pairs))
        self.routers = nn.ModuleList(TokenRouter(d) for _ in range(self.n_pairs))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as described in the class docstring."""
        super().reset_parameters()
        for prior in self.priors:
            nn.init.ones_(prior.norm.weight)
            for lin in (prior.ffn.w1, prior.ffn.w2, prior.ffn.w3):
                nn.init.normal_(lin.weight, mean=0.0, std=PRIOR_INIT_STD)
        for gate in self.gates:
            gate.reset_parameters()

    def new_cache(
        self,
        batch_size: int,
        max_len: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> KVCache:
        """An empty KV cache, plus each pair's D_st history ``extra["dtf_dst_{p}"]`` (batch_size, max_len) fp32.

        Args:
            batch_size: sequences decoded together.
            max_len: positions the cache holds (tokens); default ``context_length``.
            device: default the embedding's device.
            dtype: of K/V; default the autocast dtype when autocast is on for that device, else
                the embedding's dtype (the D_st history is always fp32).

        Raises:
            ValueError: a size is not positive.
        """
        cache = super().new_cache(batch_size, max_len, device, dtype)
        for p in range(self.n_pairs):
            cache.extra[history_key(p)] = torch.zeros(batch_size, cache.max_len, device=cache.k[0].device,
                                                      dtype=torch.float32)
        return cache

    def pair(self, p: int, h: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache] = None,
             causal: Optional[bool] = None) -> PairOutput:
        """Run pair ``p`` on h (B, T, d) with RoPE tables cos, sin (T, D/2); see :func:`pair_forward`.

        ``causal`` defaults to ``self.decode_mode`` (a cache always routes causally).
        """
        ckpt = self._checkpointing(cache)
        return pair_forward(
            self.blocks[2 * p], self.blocks[2 * p + 1], self.priors[p], self.gates[p], self.routers[p], h, cos, sin,
            gamma=self.dtf.capacity_gamma, ma_window=self.dtf.ma_window,
            causal=self.decode_mode if causal is None else causal, cache=cache, key=history_key(p), ckpt=ckpt,
        )

    def flops_per_token(self, context_length: Optional[int] = None) -> float:
        """Training FLOPs per token: ``6 N_eff + 12 d T (L/2) (1 + gamma^2)``.

        PaLM's ``6N + 12 L d T`` (arXiv 2204.02311, appendix B) with the dynamic blocks discounted:
        N_eff counts every parameter but the embedding lookup (plus the head, even when tied; so the
        decision blocks, prior FFNs, routers and gate scalars in full) and ``gamma`` of each
        dynamic block's weights, since only a share gamma of the tokens runs through them. The
        attention term is ``12 d T`` per decision block and ``gamma^2 * 12 d T`` per dynamic block:
        gamma of the queries, each seeing only the gamma*T selected keys. T defaults to
        ``context_length``; gamma = 1 gives the dense formula.
        """
        cfg = self.config
        t = self.context_length if context_length is None else context_length
        gamma = self.dtf.capacity_gamma
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.embed.weight.numel()
        dynamic = sum(p.numel() for i in range(1, cfg.n_layers, 2) for p in self.blocks[i].parameters())
        n_eff = n - (1.0 - gamma) * dynamic
        return 6.0 * n_eff + 12.0 * cfg.d_model * t * self.n_pairs * (1.0 + gamma * gamma)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts, stats).

        Outside :meth:`decoding` and without a cache each dynamic block takes the top-k tokens of
        its gate (training); otherwise the causal routers decide token by token. With a cache,
        positions start at ``cache.length`` and the cache (K/V, routed-key masks, D_st histories)
        grows by T. ``loss``, ``parts`` and ``stats`` (class docstring) come only with targets;
        the cross-entropy is in nats/token over targets != -1, computed in fp32.

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        x, cos, sin = self._embed(ids, targets, cache)  # (B, T, d), (T, D/2) x 2
        causal = self.decode_mode or cache is not None
        priors, bces, accs, rates = [], [], [], []
        for p in range(self.n_pairs):
            out = self.pair(p, x, cos, sin, cache, causal)
            x = out.h  # (B, T, d)
            if targets is not None:
                priors.append(out.prior_loss)
                if out.router_bce is not None:
                    bces.append(out.router_bce)
                    accs.append(out.router_acc)
                gt = out.gate
                rates.append(torch.stack([(gt.s_ce > 0.5).float().mean(), (gt.s_cu > 0.5).float().mean(),
                                          gt.g.mean(), out.routed.float().mean()]).detach())
        logits = self._logits(x, cache)  # (B, T, V)
        if targets is None:
            return ModelOutput(logits=logits)
        ce = cross_entropy(logits, targets)  # scalar, nats/token
        prior_loss = torch.stack(priors).mean()  # scalar
        loss = ce + self.dtf.prior_loss_weight * prior_loss
        parts = {"ce": ce.detach(), "prior_loss": prior_loss.detach()}
        rate = torch.stack(rates).mean(dim=0)  # (4,)
        stats = {"ce_rate": rate[0], "cu_rate": rate[1], "gate_mean": rate[2], "processed": rate[3]}
        if bces:
            router_bce = torch.stack(bces).mean()  # scalar, nats/token
            loss = loss + self.dtf.router_loss_weight * router_bce
            parts["router_bce"] = router_bce.detach()
            stats["router_acc"] = torch.stack(accs).mean()
        return ModelOutput(logits=logits, loss=loss, parts=parts, stats=stats)
