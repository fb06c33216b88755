"""Shared building blocks of every tfkit decoder: RMSNorm, RoPE, attention, gated FFN, Block, KVCache.

Variants compose these layers; none subclasses another. Every ``nn.Linear`` is bias-free except
the query/key/value projections with ``model.attention_bias`` (Qwen2).

Notation: B batch, T new tokens in this call, S = past + T keys visible, d = d_model,
H query heads, H_kv key/value heads, D = head_dim = d/H, F = ffn hidden width.

The attention backend arrives as a resolved string (``"sdpa"``, ``"flash"`` or ``"eager"``);
``tfkit.hardware`` decides which one a run may use, this module never probes the device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tfkit.config import ModelConfig, RopeScaling

ATTENTION_BACKENDS = ("sdpa", "flash", "eager")
"""Values accepted for the ``attention`` constructor argument."""


def _torch_version() -> tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - exotic dev builds
        return 0, 0


SDPA_SUPPORTS_GQA = _torch_version() >= (2, 5)
"""``F.scaled_dot_product_attention(..., enable_gqa=True)`` exists (torch >= 2.5).

When False, K/V heads are repeated with ``repeat_interleave`` before the call. Tests flip this
module attribute to check that both paths agree."""


# ---------------------------------------------------------------------------------------------
# Normalisation


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / sqrt(mean(x**2) + eps) * g`` over the last dim.

    Computed in fp32 and cast back to the input dtype; the gain ``g`` starts at 1 and there is
    no bias or mean subtraction. Zhang & Sennrich, "Root Mean Square Layer Normalization",
    arXiv 1910.07467.

    Args:
        dim: size of the last dimension (d_model, or head_dim for QK-norm).
        eps: added to the mean square before the square root.

    Shapes:
        x (..., dim) -> (..., dim), same dtype as x.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (dim,)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()  # (..., dim) fp32
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., dim)
        return (xf * self.weight.float()).to(x.dtype)  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables; rotates consecutive pairs ``(x[2k], x[2k+1])`` of each head.

    Pair k of a token at position p turns by the angle ``p * theta**(-2k/D)`` (k = 0..D/2-1).
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv 2104.09864.

    ``cos``/``sin`` are non-persistent fp32 buffers of shape (max_len, D/2), built for
    ``context_length`` positions and rebuilt (at least doubled) on demand when a call asks for
    positions beyond them, so cached decoding may run past ``context_length``. They are also
    rebuilt in fp32 if ``model.to(dtype)`` has cast them.

    Args:
        head_dim: D, even.
        context_length: positions to precompute.
        theta: base frequency (10000 in RoFormer and Llama).
        scaling: ``model.rope_scaling`` (:func:`llama3_frequencies`), or None.

    Raises:
        ValueError: head_dim is odd.
    """

    def __init__(self, head_dim: int, context_length: int, theta: float = 10000.0,
                 scaling: Optional[RopeScaling] = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.scaling = scaling
        cos, sin = self._tables(context_length, device=None)
        self.register_buffer("cos", cos, persistent=False)  # (max_len, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (max_len, D/2)

    def _tables(self, length: int, device: Optional[torch.device]) -> tuple[Tensor, Tensor]:
        k = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device)  # (D/2,) = 2k
        inv_freq = self.theta ** (-k / self.head_dim)  # (D/2,)
        if self.scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, self.scaling)  # (D/2,)
        pos = torch.arange(length, dtype=torch.float64, device=device)  # (max_len,)
        angles = torch.outer(pos, inv_freq)  # (max_len, D/2)
        return angles.cos().float(), angles.sin().float()

    def init_buffers(self) -> None:
        """Recompute the tables in place (after :meth:`LanguageModel.materialize` gave them
        uninitialised storage)."""
        self.cos, self.sin = self._tables(self.cos.shape[0], device=self.cos.device)

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin for positions ``start .. start+length-1``, each (length, D/2) fp32."""
        end = start + length
        if end > self.cos.shape[0] or self.cos.dtype != torch.float32:
            new_len = max(end, self.cos.shape[0] * (2 if end > self.cos.shape[0] else 1))
            self.cos, self.sin = self._tables(new_len, device=self.cos.device)
        return self.cos[start:end], self.sin[start:end]  # (T, D/2), (T, D/2)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, cached={self.cos.shape[0]}"


def llama3_frequencies(inv_freq: Tensor, scaling: RopeScaling) -> Tensor:
    """RoPE frequencies (D/2,) rescaled by Llama 3.1's rule (arXiv 2407.21783, the ``llama3``
    ``rope_scaling`` of Hugging Face configs): frequencies whose wavelength ``2 pi / f`` exceeds
    ``original_context_length / low_freq_factor`` are divided by ``factor``, those whose wavelength
    is below ``original_context_length / high_freq_factor`` are kept, and the band between is a
    linear blend of the two in ``original_context_length / wavelength``."""
    old = float(scaling.original_context_length)
    wavelen = 2 * math.pi / inv_freq  # (D/2,) positions per turn
    ratio = old / wavelen  # (D/2,) turns over the original context
    smooth = ((ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq  # (D/2,)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of the last dim of ``x`` by the RoPE angles (arXiv 2104.09864).

    Each pair ``(x[2k], x[2k+1])`` is read as the complex number ``x[2k] + i x[2k+1]`` and
    multiplied by ``cos + i sin``: one complex multiply forward and one backward instead of four
    real products, two sums and a stack (as Llama's reference code does; 3x faster on CPU). Under
    ``torch.compile`` the real form is used, which Inductor fuses. Computed in fp32 and cast back
    to ``x.dtype``.

    Shapes:
        x (B, H, T, D); cos, sin (T, D/2) or (B, 1, T, D/2) -> (B, H, T, D).
    """
    if _compiling():  # Inductor fuses the real form into one kernel, and handles complex tensors poorly
        xf = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]  # (B, H, T, D/2) each
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D/2, 2)
        return out.flatten(-2).to(x.dtype)  # (B, H, T, D)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, H, T, D/2) complex64
    rot = torch.complex(cos, sin)  # (T, D/2) or (B, 1, T, D/2) complex64
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)  # (B, H, T, D)


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


# ---------------------------------------------------------------------------------------------
# Key/value cache


class KVCache:
    """Preallocated post-RoPE keys and values of every layer, for incremental decoding.

    Each layer owns ``k[i]``, ``v[i]`` of shape (B, H_kv, max_len, D). ``length`` counts the
    positions already written (the next token's position). A forward call writes its T new
    positions into every layer at ``length .. length+T-1`` and then calls :meth:`advance` once.
    GQA shrinks the cache H/H_kv-fold compared with multi-head attention.

    Args:
        n_layers, batch_size, n_kv_heads, max_len, head_dim: the tensor shapes above.
        device, dtype: of the buffers (the attention casts them to the query dtype when read).

    Routed layers (MoD, DTF) also keep ``masks[i]`` (B, max_len) bool, the positions whose keys
    exist (:meth:`update_mask`), and variants may keep per-position state of their own in
    ``extra`` (a dict of tensors with a ``max_len`` axis, indexed by position like the K/V).

    Raises:
        ValueError: a size is not positive (constructor); a write would pass ``max_len``
            (:meth:`check_room`); the batch size differs from the cache's.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"KVCache {name} must be >= 1, got {value}")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]  # (B, H_kv, max_len, D)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]  # (B, H_kv, max_len, D)
        self.masks: list[Optional[Tensor]] = [None] * n_layers  # (B, max_len) bool, routed layers only
        self.extra: dict[str, Tensor] = {}  # variant state per position, e.g. DTF's (B, max_len) surprise history
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise ValueError unless ``new_tokens`` more positions of this batch size fit."""
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache was made for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.length + new_tokens > self.max_len:
            raise ValueError(
                f"KVCache full: {self.length} cached + {new_tokens} new tokens > max_len={self.max_len}; "
                "make a larger cache with `model.new_cache(batch_size, max_len)` or call `cache.reset()`"
            )

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this layer's new keys/values at ``length..`` and return all keys/values so far.

        Shapes:
            k, v (B, H_kv, T, D) -> (B, H_kv, length+T, D) each (views into the cache).
        """
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, H_kv, S, D) each

    def update_mask(self, layer: int, keep: Tensor) -> Tensor:
        """Record which of this layer's new positions hold real keys (routed layers of MoD/DTF).

        A token a routed layer skipped writes no usable K/V there: its slot is masked out of
        every later query's attention, as if the cache held only the processed tokens.

        Shapes:
            keep (B, T) bool -> (B, length+T) bool, every position so far.
        """
        if self.masks[layer] is None:
            self.masks[layer] = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=keep.device)
        end = self.length + keep.shape[1]
        self.masks[layer][:, self.length : end] = keep
        return self.masks[layer][:, :end]  # (B, S)

    def advance(self, new_tokens: int) -> None:
        """Mark ``new_tokens`` more positions as written (once per forward, after every layer)."""
        self.length += new_tokens

    def reset(self) -> None:
        """Forget every cached position (buffers are kept and overwritten)."""
        self.length = 0


# ---------------------------------------------------------------------------------------------
# Attention


def _causal_mask(t: int, s: int, device: torch.device) -> Tensor:
    """Boolean (T, S) mask, True = may attend: query i (at position S-T+i) sees keys j <= S-T+i."""
    past = s - t
    rows = torch.arange(t, device=device).unsqueeze(1) + past  # (T, 1)
    cols = torch.arange(s, device=device).unsqueeze(0)  # (1, S)
    return cols <= rows  # (T, S)


def eager_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Reference causal attention ``softmax(q k^T / sqrt(D)) v`` (Vaswani et al., arXiv 1706.03762).

    K/V heads are repeated (``repeat_interleave``) to the query heads; the softmax runs in fp32.
    The T queries are the last T of the S positions (bottom-right causal alignment).

    Shapes:
        q (B, H, T, D); k, v (B, H_kv, S, D) -> (B, H, T, D).
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    mask = _causal_mask(q.shape[2], k.shape[2], q.device)  # (T, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, T, S)
    probs = scores.softmax(dim=-1)  # (B, H, T, S)
    return (probs @ v.float()).to(q.dtype)  # (B, H, T, D)


def _sdpa_gqa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, dict]:
    """K, V and SDPA keyword arguments for grouped-query attention: ``enable_gqa=True`` when torch
    supports it (>= 2.5), otherwise K/V heads repeated to the H query heads."""
    if q.shape[1] == k.shape[1]:
        return k, v, {}
    if SDPA_SUPPORTS_GQA:
        return k, v, {"enable_gqa": True}
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), {}  # (B, H, S, D) each


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Full sequences (T == S) use ``is_causal=True``; one new token after a cache needs no mask;
    several new tokens after a cache get an explicit (T, S) mask offset by the cache length
    (``is_causal`` would align top-left). GQA uses ``enable_gqa=True`` when torch supports it
    (>= 2.5), otherwise K/V heads are repeated.

    Shapes:
        q (B, H, T, D); k, v (B, H_kv, S, D) -> (B, H, T, D).
    """
    t, s = q.shape[2], k.shape[2]
    k, v, kwargs = _sdpa_gqa(q, k, v)  # (B, H_kv or H, S, D) each
    if t == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)  # (B, H, T, D)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)  # (B, H, 1, D)
    mask = _causal_mask(t, s, q.device)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)  # (B, H, T, D)


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention through ``flash_attn.flash_attn_func`` (Dao, FlashAttention-2, arXiv 2307.08691).

    CUDA with bf16/fp16 only; ``tfkit.hardware`` selects this backend only where flash-attn is
    installed. flash-attn >= 2.1 aligns the causal mask bottom-right when T < S, which is what
    cached decoding needs, and handles GQA natively.

    Shapes:
        q (B, H, T, D); k, v (B, H_kv, S, D) -> (B, H, T, D).

    Raises:
        ValueError: q is not bf16/fp16.
        ImportError: flash-attn is not installed.
    """
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"attention=flash needs bf16 or fp16 activations, got {q.dtype}; use precision bf16/fp16 or attention=sdpa"
        )
    from flash_attn import flash_attn_func  # lazy: optional dependency

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # (B, T, H, D)
    return out.transpose(1, 2)  # (B, H, T, D)


_BACKENDS = {"sdpa": sdpa_attention, "flash": flash_attention, "eager": eager_attention}


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention with an explicit boolean mask (True = may attend), through SDPA.

    Used where the plain causal kernels do not fit: non-causal encoders, and routed layers whose
    queries may only see the keys of routed tokens. Every query row must allow at least one key.

    Shapes:
        q (B, H, T, D); k, v (B, H_kv, S, D); mask broadcastable to (B, H, T, S) -> (B, H, T, D).
    """
    k, v, kwargs = _sdpa_gqa(q, k, v)  # (B, H_kv or H, S, D) each
    if q.dtype != k.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)  # (B, H, T, D)


def attention_mask(t: int, s: int, device: torch.device, causal: bool = True,
                   key_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """Boolean mask for :func:`masked_attention`, or None when plain causal attention will do.

    ``key_mask`` (B, S) marks the keys that exist (routed tokens); each query also keeps its own
    position so that no row is empty (the output of a query whose token was not routed is
    discarded by the caller).

    Returns:
        (B, 1, T, S) or (T, S) bool, or None for the plain causal case.
    """
    if causal and key_mask is None:
        return None
    if causal:
        allowed = _causal_mask(t, s, device)  # (T, S)
    else:
        allowed = torch.ones(t, s, dtype=torch.bool, device=device)  # (T, S)
    if key_mask is None:
        return allowed
    self_pos = torch.arange(t, device=device).unsqueeze(1) + (s - t) == torch.arange(s, device=device)  # (T, S)
    return (allowed & key_mask[:, None, None, :]) | self_pos  # (B, 1, T, S)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE, optional QK-norm and a KV cache.

    q = x Wq -> (B, H, T, D); k, v = x Wk, x Wv -> (B, H_kv, T, D); each group of H/H_kv query
    heads shares one K/V head (GQA, Ainslie et al., arXiv 2305.13245; H_kv = H is multi-head
    attention). With ``qk_norm`` an RMSNorm over D is applied to q and k before RoPE (OLMo 2,
    arXiv 2501.00656). The cache stores post-RoPE K and V.

    Parameters: ``wq`` (H*D, d), ``wk``/``wv`` (H_kv*D, d), ``wo`` (d, H*D), with attention_bias
    the biases ``wq.bias`` (H*D,) and ``wk.bias``/``wv.bias`` (H_kv*D,) (Qwen2), and with qk_norm
    ``q_norm``/``k_norm`` (D,). D may differ from d/H (``model.head_dim``, Qwen3).

    Args:
        cfg: model shape (d_model, n_heads, kv_heads, head_dim, qk_norm, norm_eps).
        layer: index of the layer (selects this layer's slot in a KVCache).
        attention: backend, one of :data:`ATTENTION_BACKENDS`.

    Raises:
        ValueError: unknown attention backend.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in _BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        self.layer = layer
        self.backend = attention
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_size
        d, hd = cfg.d_model, cfg.head_size
        bias = cfg.attention_bias
        self.wq = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache] = None,
                kv: Optional[Tensor] = None, causal: bool = True, key_mask: Optional[Tensor] = None) -> Tensor:
        """Self-attention of x, or x attending to ``kv``.

        Args:
            x: (B, T, d) queries (and keys/values unless ``kv`` is given).
            cos, sin: (T, D/2) RoPE tables for positions cache.length.. (or 0..), or
                (B, 1, T, D/2) for gathered tokens with per-row positions.
            cache: KV cache to read and extend.
            kv: (B, T, d) input of the keys and values, at the same positions as x (Free
                Transformer's injected layer); default x.
            causal: False = every query sees every key (a non-causal encoder; no cache).
            key_mask: (B, T) bool, the tokens whose keys exist (a routed layer's processed
                tokens); with a cache the mask is stored so later queries see only those keys.

        Returns:
            (B, T, d).
        """
        b, t, _ = x.shape
        src = x if kv is None else kv
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(src).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.wv(src).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, D), (B, H_kv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, D), (B, H_kv, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, S, D) each
            k, v = k.to(q.dtype), v.to(q.dtype)  # (B, H_kv, S, D) each
            if key_mask is not None:
                key_mask = cache.update_mask(self.layer, key_mask)  # (B, S)
            elif cache.masks[self.layer] is not None:
                key_mask = cache.update_mask(self.layer, torch.ones(b, t, dtype=torch.bool, device=x.device))
        mask = attention_mask(t, k.shape[2], x.device, causal, key_mask)  # None, (T, S) or (B, 1, T, S)
        if mask is None:
            y = _BACKENDS[self.backend](q, k, v)  # (B, H, T, D)
        else:
            y = masked_attention(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(y)  # (B, T, d)


# ---------------------------------------------------------------------------------------------
# Feed-forward and block


class FeedForward(nn.Module):
    """Gated feed-forward ``W2(act(W1 x) * W3 x)`` (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202).

    ``swiglu`` uses SiLU, ``geglu`` exact (erf) GELU. Parameters ``w1``, ``w3`` (F, d), ``w2`` (d, F).

    Shapes:
        x (B, T, d) -> (B, T, d).

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(self, d_model: int, hidden: int, kind: str = "swiglu") -> None:
        super().__init__()
        if kind not in ("swiglu", "geglu"):
            raise ValueError(f"unknown ffn {kind!r}; choose swiglu or geglu")
        self.kind = kind
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.w1(x)  # (B, T, F)
        gate = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="none")  # (B, T, F)
        return self.w2(gate * self.w3(x))  # (B, T, d)


class Block(nn.Module):
    """Pre-norm decoder block: ``u = x + attn(norm(x))``, ``x' = u + ffn(norm(u))``.

    Submodules ``attn_norm``, ``attn``, ``ffn_norm``, ``ffn`` (stable parameter names for
    checkpoints, e.g. ``blocks.0.attn.wq.weight``).

    Shapes:
        x (B, T, d); cos, sin (T, D/2) -> (B, T, d).
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0, attention: str = "sdpa") -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer, attention)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.ffn)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache] = None,
                kv: Optional[Tensor] = None, causal: bool = True, key_mask: Optional[Tensor] = None) -> Tensor:
        """See :meth:`Attention.forward` for ``kv`` (normed with the same ``attn_norm``), ``causal``, ``key_mask``."""
        h = self.attn_norm(x)  # (B, T, d)
        u = x + self.attn(h, cos, sin, cache, None if kv is None else self.attn_norm(kv), causal, key_mask)  # (B, T, d)
        return u + self.ffn(self.ffn_norm(u))  # (B, T, d)


# ---------------------------------------------------------------------------------------------
# Token routing (Mixture-of-Depths, Dynamic Transformer)


def topk_positions(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest scores of each row, in time order (MoD, arXiv 2404.02258).

    Shapes:
        scores (B, T) -> (B, k) int64, increasing along each row.
    """
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, k)


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of each sequence: x (B, T, ...) , idx (B, k) -> (B, k, ...)."""
    shape = idx.shape + (1,) * (x.dim() - 2)
    return x.gather(1, idx.view(shape).expand(*idx.shape, *x.shape[2:]))  # (B, k, ...)


def gathered_rope(cos: Tensor, sin: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE tables at per-row positions: cos, sin (T, D/2), idx (B, k) -> (B, 1, k, D/2) each."""
    return cos[idx].unsqueeze(1), sin[idx].unsqueeze(1)  # (B, 1, k, D/2) each


def routed_delta(block: Block, x: Tensor, cos: Tensor, sin: Tensor, idx: Optional[Tensor] = None,
                 keep: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A block's residual update ``Block(x_s) - x_s`` on the routed tokens only.

    Two equivalent ways to say which tokens are routed:

    * ``idx`` (B, k): top-k positions (training). The block runs on the gathered (B, k, d)
      sub-sequence with the tokens' original RoPE positions, attending causally among them.
    * ``keep`` (B, T) bool: per-token decisions of a causal router (generation). The block runs on
      all T tokens but each query sees only the keys of kept tokens (and of kept tokens in
      ``cache``); rows of tokens not kept are computed and must be discarded by the caller.

    Returns:
        (delta, idx): delta (B, k, d) for ``idx``, or (B, T, d) for ``keep``.
    """
    if idx is not None:
        xs = gather_tokens(x, idx)  # (B, k, d)
        cs, sn = gathered_rope(cos, sin, idx)  # (B, 1, k, D/2) each
        return block(xs, cs, sn) - xs, idx  # (B, k, d)
    return block(x, cos, sin, cache, key_mask=keep) - x, None  # (B, T, d)


def scatter_add_tokens(x: Tensor, idx: Tensor, update: Tensor) -> Tensor:
    """x with ``update`` added at rows ``idx``; other rows are returned bit-identical.

    Shapes:
        x (B, T, d), idx (B, k), update (B, k, d) -> (B, T, d).
    """
    return x.scatter_add(1, idx.unsqueeze(-1).expand_as(update), update.to(x.dtype))  # (B, T, d)


class TokenRouter(nn.Module):
    """Causal per-token routing predictor: ``d -> d/2 -> SiLU -> 1`` on stop-gradient inputs.

    Trained with BCE to predict whether top-k routing selected each token, so generation can
    route token by token (logit > 0 = route). Raposo et al., arXiv 2404.02258 §3.5 method (ii);
    the MLP shape follows the Dynamic-Transformers repository.

    Shapes:
        x (B, T, d) -> (B, T) logits (fp32).
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        hidden = max(1, d_model // 2)
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x.detach()))).squeeze(-1).float()  # (B, T)

    def loss_and_accuracy(self, logits: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
        """Mean BCE (nats) of ``logits`` (B, T) against the 0/1 top-k choice ``selected`` (B, T),
        and the share of tokens the predictor gets right (detached)."""
        target = selected.float()  # (B, T)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        acc = ((logits > 0) == selected).float().mean().detach()
        return bce, acc
