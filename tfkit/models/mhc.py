"""Manifold-constrained hyper-connections (mHC): n residual streams mixed by doubly stochastic matrices.

Hyper-connections (Zhu et al., arXiv 2409.19606) widen the residual stream into n streams
X (B, T, n, d) and, around every sublayer F (attention and FFN separately), read, mix and write
them with per-token coefficients: ``X <- H_res X + H_post (x) F(H_pre X)``. mHC (DeepSeek, Xie et
al., arXiv 2512.24880) constrains them so that products over depth stay bounded: H_res is made
doubly stochastic by Sinkhorn-Knopp, H_pre and H_post are non-negative (sigmoids).

One :class:`HyperMixer` per sublayer, for X (B, T, n, d):

1. x~ = RMSNorm(flatten(X)) over n*d, in fp32, with its own gain ``norm.weight`` (n*d,).
2. dyn = x~ @ phi, phi (n*d -> 2n + n^2), split into pre (n), post (n), res (n x n, row-major).
3. H~_pre = alpha_pre*dyn_pre + b_pre, H~_post = alpha_post*dyn_post + b_post,
   H~_res = alpha_res*dyn_res + b_res (each alpha a scalar parameter).
4. H_pre = sigma(H~_pre) in (0, 1); H_post = 2 sigma(H~_post) in (0, 2); H_res = Sinkhorn(exp(H~_res))
   with ``sinkhorn_iters`` iterations, each normalising columns then rows, in fp32 log space.
5. u = sum_i H_pre,i X_i (B, T, d); y = F(u), where F includes its own pre-norm
   (``attn(attn_norm(u))`` or ``ffn(ffn_norm(u))``, the llama block's modules).
6. X <- H_res X + H_post (x) y: new stream i = sum_j H_res[i, j] X_j + H_post,i y.

The token embedding is replicated into the n streams; at the end the streams are averaged (the
HC paper's sum, divided by n: see :class:`HyperConnectionTransformer`), then the final ``norm``
and the head. The mixing is per token, so attention is the only place tokens meet and a plain KV
cache (K/V from the mixed input u) serves decoding.

Parameter names: everything llama has (``embed.weight``, ``blocks.{i}.attn_norm.weight``,
``blocks.{i}.attn.{wq,wk,wv,wo}.weight``, ``blocks.{i}.ffn_norm.weight``,
``blocks.{i}.ffn.{w1,w2,w3}.weight``, ``norm.weight``, ``head.weight`` when untied), plus per
layer i and sublayer s in {attn, ffn}: ``mixers.{i}.{s}.norm.weight`` (n*d,),
``mixers.{i}.{s}.phi.weight`` (2n+n^2, n*d), ``mixers.{i}.{s}.alpha_{pre,post,res}`` (0-dim),
``mixers.{i}.{s}.b_pre`` (n,), ``mixers.{i}.{s}.b_post`` (n,), ``mixers.{i}.{s}.b_res`` (n*n,),
the row-major flattening of the n x n matrix (flat so that the optimizer's "ndim >= 2 is a
matrix" rule does not weight-decay it towards uniform mixing). With ``mhc.enabled = false`` the
model is exactly llama: same modules, same names, same logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfkit.config import MHCConfig, ModelConfig
from tfkit.models.base import LanguageModel, ModelOutput, cross_entropy
from tfkit.models.layers import KVCache, RMSNorm

PRE_BIAS_INIT = 2.0
"""|b_pre| at init: +2 on the stream a sublayer favours, -2 on the others (H_pre ~ 0.88 / 0.12)."""

RES_OFFDIAG_INIT = -4.0
"""b_res off the diagonal at init (0 on it): H_res ~ 0.95 on the diagonal for n = 4."""

GATE_EPS = 1e-6
"""Sigmoid gates are squeezed into [eps, 1 - eps] so that H_pre in (0, 1), H_post in (0, 2) hold in fp32."""


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and the per-sublayer mixer


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Doubly stochastic projection ``Sinkhorn-Knopp(exp(logits))`` (Sinkhorn & Knopp 1967; mHC eq. 8).

    Each of the ``iters`` iterations divides every column by its sum, then every row by its
    sum, so the rows of the result sum to 1 up to rounding and the columns approximately (the
    error shrinks geometrically with ``iters``). Computed in fp32. The first iteration runs in
    log space (``logsumexp``), which cannot overflow and leaves every row summing to 1, so no
    row underflows to zeros however large the logits; the others divide plainly (column sums
    floored at 1e-30 against 0/0), because on a CPU these 2 * iters small reductions per
    sublayer are most of mHC's extra cost and ``logsumexp`` costs several ``sum``s. For n = 1
    the result is exactly 1.

    Shapes:
        logits (..., n, n) -> (..., n, n) fp32, entries >= 0.
    """
    z = logits.float()  # (..., n, n)
    z = z - z.logsumexp(dim=-2, keepdim=True)  # (..., n, n) columns sum to 1 (log space)
    m = (z - z.logsumexp(dim=-1, keepdim=True)).exp()  # (..., n, n) rows sum to 1
    for _ in range(iters - 1):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(1e-30)  # (..., n, n) columns sum to 1
        m = m / m.sum(dim=-1, keepdim=True)  # (..., n, n) rows sum to 1
    return m  # (..., n, n)


def _gate(x: Tensor) -> Tensor:
    """sigma(x) squeezed into [GATE_EPS, 1 - GATE_EPS] (fp32 sigma rounds to exactly 0 or 1 for |x| > ~17)."""
    return GATE_EPS + (1.0 - 2.0 * GATE_EPS) * torch.sigmoid(x)


class HyperMixer(nn.Module):
    """The mHC connection around one sublayer: reads the n streams into u, writes y = F(u) back.

    Parameters: ``norm.weight`` (n*d,) gain of the fp32 RMSNorm over the flattened streams;
    ``phi.weight`` (2n+n^2, n*d), the token-dependent projection; ``alpha_pre``, ``alpha_post``,
    ``alpha_res`` 0-dim scales of its three parts; static biases ``b_pre`` (n,), ``b_post`` (n,)
    and ``b_res`` (n*n,), the n x n matrix row-major.

    Init (:meth:`reset_parameters`): phi ~ N(0, init_std); alpha = alpha_init; b_post = 0
    (H_post = 1); b_res = 0 on the diagonal and ``RES_OFFDIAG_INIT`` off it (H_res near the
    identity); b_pre = +``PRE_BIAS_INIT`` for stream ``stream`` and -``PRE_BIAS_INIT`` for the
    others (the HC paper's one-hot H_pre = e_{k mod n}, softened). With identical streams the
    model then computes the plain residual model's function up to the alpha * dyn terms (rows of
    H_res sum to 1, H_post = 1, the sublayer's pre-norm absorbs the scale of u), while the
    different b_pre give the streams different gradients and the random phi different
    coefficients, which breaks the symmetry between the replicated streams.

    Args:
        n: streams.
        d: d_model.
        eps: of the RMSNorm over n*d.
        sinkhorn_iters: Sinkhorn-Knopp iterations for H_res.

    Shapes:
        :meth:`coefficients`: X (B, T, n, d) -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n), fp32.
        :meth:`forward`: X (B, T, n, d), F: (B, T, d) -> (B, T, d) -> X (B, T, n, d), H_res.
    """

    def __init__(self, n: int, d: int, eps: float = 1e-5, sinkhorn_iters: int = 20) -> None:
        super().__init__()
        self.n, self.d, self.sinkhorn_iters = n, d, sinkhorn_iters
        self.norm = RMSNorm(n * d, eps)
        self.phi = nn.Linear(n * d, 2 * n + n * n, bias=False)
        self.alpha_pre = nn.Parameter(torch.zeros(()))
        self.alpha_post = nn.Parameter(torch.zeros(()))
        self.alpha_res = nn.Parameter(torch.zeros(()))
        self.b_pre = nn.Parameter(torch.zeros(n))  # (n,)
        self.b_post = nn.Parameter(torch.zeros(n))  # (n,)
        self.b_res = nn.Parameter(torch.zeros(n * n))  # (n*n,) row-major (n, n)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02, alpha_init: float = 0.01, stream: int = 0) -> None:
        """Initialise as in the class docstring; ``stream`` is the stream H_pre favours."""
        n = self.n
        nn.init.normal_(self.phi.weight, mean=0.0, std=init_std)
        nn.init.ones_(self.norm.weight)
        for a in (self.alpha_pre, self.alpha_post, self.alpha_res):
            a.fill_(alpha_init)
        self.b_pre.fill_(-PRE_BIAS_INIT)
        self.b_pre[stream % n] = PRE_BIAS_INIT
        self.b_post.zero_()
        eye = torch.eye(n, dtype=torch.bool, device=self.b_res.device).flatten()  # (n*n,)
        self.b_res.copy_(torch.where(eye, 0.0, RES_OFFDIAG_INIT))

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """H_pre (B, T, n) in (0, 1), H_post (B, T, n) in (0, 2), H_res (B, T, n, n) doubly stochastic; fp32."""
        n = self.n
        with torch.autocast(x.device.type, enabled=False):
            xn = self.norm(x.flatten(-2).float())  # (B, T, n*d) fp32
            dyn = F.linear(xn, self.phi.weight.float())  # (B, T, 2n+n^2) fp32
        pre = self.alpha_pre.float() * dyn[..., :n] + self.b_pre.float()  # (B, T, n)
        post = self.alpha_post.float() * dyn[..., n : 2 * n] + self.b_post.float()  # (B, T, n)
        res = self.alpha_res.float() * dyn[..., 2 * n :] + self.b_res.float()  # (B, T, n*n)
        h_res = sinkhorn(res.unflatten(-1, (n, n)), self.sinkhorn_iters)  # (B, T, n, n)
        return _gate(pre), 2.0 * _gate(post), h_res

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Read u = sum_i H_pre,i X_i, run y = sublayer(u), write X' = H_res X + H_post (x) y.

        The mixing runs in fp32 and X' keeps the dtype of X (the residual dtype, as in llama).

        Returns:
            X' (B, T, n, d) and H_res (B, T, n, n) fp32 (for the Amax statistics).
        """
        h_pre, h_post, h_res = self.coefficients(x)  # (B, T, n), (B, T, n), (B, T, n, n)
        xf = x.float()  # (B, T, n, d)
        u = (h_pre.unsqueeze(-1) * xf).sum(dim=-2).to(x.dtype)  # (B, T, d)
        y = sublayer(u)  # (B, T, d)
        out = torch.matmul(h_res, xf) + h_post.unsqueeze(-1) * y.float().unsqueeze(-2)  # (B, T, n, d)
        return out.to(x.dtype), h_res

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}, sinkhorn_iters={self.sinkhorn_iters}"


class LayerMixers(nn.Module):
    """The two :class:`HyperMixer` of one layer: ``attn`` and ``ffn`` (named ``mixers.{i}.attn``/``.ffn``)."""

    def __init__(self, n: int, d: int, eps: float, sinkhorn_iters: int) -> None:
        super().__init__()
        self.attn = HyperMixer(n, d, eps, sinkhorn_iters)
        self.ffn = HyperMixer(n, d, eps, sinkhorn_iters)


# ---------------------------------------------------------------------------------------------
# Model


class HyperConnectionTransformer(LanguageModel):
    """Llama with its single residual stream widened into n streams joined by mHC mixers.

    Modules: ``embed``; ``blocks.{i}`` llama :class:`~tfkit.models.layers.Block` whose submodules
    (``attn_norm``, ``attn``, ``ffn_norm``, ``ffn``) are called one sublayer at a time;
    ``mixers.{i}.attn`` and ``mixers.{i}.ffn`` (:class:`HyperMixer`); final ``norm``; ``head``
    only when untied (tied logits are ``x @ embed.weight.T``). With ``cfg.mhc.enabled = False``
    there are no mixers and the forward is llama's, so llama checkpoints load strictly and give
    identical logits.

    Streams: the embedding (B, T, d) is replicated into X (B, T, n, d); each layer runs
    ``X <- mixers.i.attn(X, attn)`` then ``X <- mixers.i.ffn(X, ffn)``. Collapse: the mean of the
    n streams, then ``norm`` and the head. The HC paper and lucidrains sum the streams; the mean
    is that sum divided by n, which the final RMSNorm absorbs up to its eps. It is used so that
    replicated (identical) streams feed the final norm exactly what llama's residual would, and
    the norm's eps acts at the same scale as in llama. No learned collapse.

    Init: llama's (every Linear/Embedding ~ N(0, init_std), ``attn.wo``/``ffn.w2`` ~
    N(0, init_std / sqrt(2 * n_layers)), norm gains 1), then each mixer as in
    :meth:`HyperMixer.reset_parameters` with ``stream = (2 * i + s) mod n`` for sublayer s = 0
    (attn), 1 (ffn) of layer i, so successive sublayers favour successive streams.

    Stats (detached fp32 0-dim, when enabled): ``amax_fwd`` / ``amax_bwd``, the mHC paper's Amax
    gain of the composed residual map P = H_res(last sublayer) ... H_res(first) (per token,
    (B, T, n, n)): the max over tokens of the largest absolute row sum (forward signal gain) and
    of the largest absolute column sum (backward gradient gain). Rows of each H_res sum to 1, so
    ``amax_fwd`` is 1 up to rounding; ``amax_bwd`` exceeds 1 by at most about
    (2 * n_layers) * (Sinkhorn column error). ``h_res_diag``: mean diagonal entry of H_res over
    sublayers and tokens (1 = streams kept apart, 1/n = fully mixed). No losses besides ``ce``.

    Args:
        cfg: model shape with ``cfg.mhc`` (defaults of :class:`~tfkit.config.MHCConfig` when None);
            ``cfg.vocab_size`` must be set.
        attention: ``"sdpa"``, ``"flash"`` or ``"eager"``.
        grad_checkpointing: recompute each layer (both sublayers and their mixers) in backward
            while training (``torch.utils.checkpoint``, non-reentrant).

    Shapes:
        ids (B, T) int64 -> logits (B, T, V).

    Raises:
        ValueError: ``cfg.vocab_size`` is None or the attention backend is unknown.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        self._init_trunk(cfg, attention, grad_checkpointing)
        self.mhc = cfg.mhc if cfg.mhc is not None else MHCConfig()
        self.mixers = None
        if self.mhc.enabled:
            n, it = self.mhc.n_streams, self.mhc.sinkhorn_iters
            self.mixers = nn.ModuleList(LayerMixers(n, cfg.d_model, cfg.norm_eps, it) for _ in range(cfg.n_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as described in the class docstring."""
        super().reset_parameters()
        std = self.config.init_std
        if self.mixers is not None:
            for i, layer in enumerate(self.mixers):
                layer.attn.reset_parameters(std, self.mhc.alpha_init, stream=2 * i)
                layer.ffn.reset_parameters(std, self.mhc.alpha_init, stream=2 * i + 1)

    def flops_per_token(self, context_length: Optional[int] = None) -> float:
        """Training FLOPs per token: llama's ``6N + 12 L d T`` plus the stream mixing.

        N (through ``num_params``) already holds the mixers' parameters, so their only matmul,
        x~ @ phi, is counted. What N misses is the mixing itself, per sublayer and token in the
        forward: H_res X (2 n^2 d), the read u = H_pre X (2 n d) and the write H_post (x) y plus
        its add (2 n d); times 3 for forward + backward and 2 sublayers per layer:
        ``12 L d n (n + 2)``. Sinkhorn (O(iters n^2) per sublayer) and the norms are left out,
        as llama leaves out its norms. Disabled: exactly llama's count.
        """
        base = super().flops_per_token(context_length)
        if self.mixers is None:
            return base
        cfg, n = self.config, self.mhc.n_streams
        return base + 12.0 * cfg.n_layers * cfg.d_model * n * (n + 2)

    def shard_units(self) -> list[nn.Module]:
        """With the mixers, each block's attention and FFN are called one by one (through the
        mixers), never the block's ``forward``: FSDP2 shards those."""
        if self.mixers is None:
            return super().shard_units()
        return [m for b in self.blocks for m in (b.attn, b.ffn)]

    def _layer(self, i: int, x: Tensor, cos: Tensor, sin: Tensor,
               cache: Optional[KVCache] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i on the streams x (B, T, n, d) -> (x', H_res attn, H_res ffn), H_res detached (B, T, n, n)."""
        block, mix = self.blocks[i], self.mixers[i]
        x, h_attn = mix.attn(x, lambda u: block.attn(block.attn_norm(u), cos, sin, cache))  # (B, T, n, d)
        x, h_ffn = mix.ffn(x, lambda u: block.ffn(block.ffn_norm(u)))  # (B, T, n, d)
        return x, h_attn.detach(), h_ffn.detach()

    @torch.no_grad()
    def _stats(self, h_res: list[Tensor]) -> dict[str, Tensor]:
        """Amax of the composed H_res and the mean diagonal of H_res, from per-sublayer (B, T, n, n)."""
        p = h_res[0]  # (B, T, n, n)
        for h in h_res[1:]:
            p = torch.matmul(h, p)  # (B, T, n, n), later sublayers on the left
        a = p.abs()  # (B, T, n, n)
        diag = torch.stack([h.diagonal(dim1=-2, dim2=-1).mean() for h in h_res]).mean()
        return {"amax_fwd": a.sum(dim=-1).amax(), "amax_bwd": a.sum(dim=-2).amax(), "h_res_diag": diag}

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts={"ce"}, stats).

        ``loss`` = mean cross-entropy in nats/token over targets != -1, computed in fp32 from the
        logits (0 when every target is -1). ``stats`` (``amax_fwd``, ``amax_bwd``,
        ``h_res_diag``) whenever mHC is enabled. With a cache, positions start at
        ``cache.length`` and the cache grows by T. ``decode_mode`` changes nothing (the model is
        causal anyway).

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        b, t = ids.shape[0], ids.shape[-1]
        x, cos, sin = self._embed(ids, targets, cache)  # (B, T, d), (T, D/2) x 2
        ckpt = self._checkpointing(cache)
        stats: dict[str, Tensor] = {}
        if self.mixers is None:
            for block in self.blocks:
                x = self._block(block, x, cos, sin, cache, ckpt)  # (B, T, d)
        else:
            xs = x.unsqueeze(-2).expand(b, t, self.mhc.n_streams, x.shape[-1])  # (B, T, n, d)
            h_res: list[Tensor] = []
            for i in range(len(self.blocks)):
                if ckpt:
                    xs, h_attn, h_ffn = checkpoint(self._layer, i, xs, cos, sin, use_reentrant=False)
                else:
                    xs, h_attn, h_ffn = self._layer(i, xs, cos, sin, cache)  # (B, T, n, d)
                h_res += [h_attn, h_ffn]
            x = xs.mean(dim=-2)  # (B, T, d)
            stats = self._stats(h_res)
        logits = self._logits(x, cache)  # (B, T, V)
        if targets is None:
            return ModelOutput(logits=logits, stats=stats)
        ce = cross_entropy(logits, targets)  # scalar, nats/token
        return ModelOutput(logits=logits, loss=ce, parts={"ce": ce.detach()}, stats=stats)
