"""Free Transformer: a decoder with a per-token discrete latent, trained as a conditional VAE.

Fleuret, "The Free Transformer", arXiv 2510.17558 (architectures.md §4). The first ``m`` causal
blocks give X_mid (B, T, d). In training a one-block *non-causal* encoder (queries: a learned
vector ζ repeated T times; keys/values: X_mid) reads the whole sequence and a readout gives H bit
logits ℓ per token. The binary mapper samples bits b ~ Bernoulli(σ(ℓ)), turns them into the
one-hot Y of index Σ_h b_h 2^h among 2^H values, and passes gradients straight through as
``Z = Y + (G - stopgrad(G))`` with ``G_c = Π_h P(b_h = bit_h(c))``. ``R = latent_proj(Z)`` is added
to the keys/values (not the queries) of block ``m``; the remaining blocks and the head are
unchanged. The loss is ``CE + β · mean_t max(0, KL_t − κ)`` with
``KL_t = Σ_h (ln 2 − H_bern(p_{t,h}))`` nats, the KL of the independent bits to the uniform prior.
At generation there is no encoder: each position's latent index is drawn uniformly once.

Parameter names (safetensors keys): everything llama has, unchanged (``embed.weight``,
``blocks.{i}.*`` for all ``n_layers`` blocks, ``norm.weight``, ``head.weight`` when untied), so a
trained llama can initialise it by name; plus ``encoder.*`` (one :class:`Block`: ``attn_norm``,
``attn.{wq,wk,wv,wo}``, ``ffn_norm``, ``ffn.{w1,w2,w3}``), ``zeta`` (d,), ``readout.weight``
(H, d) and ``latent_proj.weight`` (d, 2^H). Non-persistent buffers (not saved): ``bit_table``
(2^H, H), ``kl_weight_now`` and ``free_bits_now`` (0-dim fp32, the schedules' current values).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tfkit.config import ModelConfig, schedule_at
from tfkit.models.base import LanguageModel, ModelOutput, cross_entropy
from tfkit.models.layers import Block, KVCache

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Latent helpers


def make_bit_table(bits: int) -> Tensor:
    """Bits of every latent index: row c holds ``(c >> h) & 1`` for h = 0..H-1.

    Shapes:
        -> (2^H, H) fp32 of 0/1.
    """
    codes = torch.arange(2**bits).unsqueeze(1)  # (2^H, 1)
    return ((codes >> torch.arange(bits)) & 1).float()  # (2^H, H)


def bit_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(σ(ℓ)), elementwise: ``−p log p − (1−p) log(1−p)``.

    Computed from the logits with ``logsigmoid`` so that extreme logits give 0, never NaN.
    """
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL (nats) of H independent Bernoulli(σ(ℓ_h)) bits to the uniform prior over 2^H values.

    ``KL = H ln 2 − Σ_h H_bern(p_h)``, summed per bit as ``Σ_h (ln 2 − H_bern(p_h))`` so that
    ℓ = 0 gives exactly 0. Lies in [0, H ln 2].

    Shapes:
        logits (..., H) fp32 -> (...) nats.
    """
    return (LN2 - bit_entropy(logits)).sum(dim=-1)


def binary_mapper(logits: Tensor, bit_table: Tensor,
                  generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """Sample the one-hot latent with a straight-through gradient (arXiv 2510.17558 §3).

    Bits ``b_h ~ Bernoulli(σ(ℓ_h))`` (uniforms from ``generator``, or the global RNG), index
    ``Σ_h b_h 2^h``, ``Y = one_hot(index)`` and ``Z = Y + (G − stopgrad(G))`` where
    ``log G_c = Σ_h log P(b_h = bit_h(c))``. The forward value of Z is exactly Y; its gradient is
    that of G. Runs in fp32 with autocast off (G feeds only the gradient, but bf16 would blur it).

    Args:
        logits: (B, T, H) bit logits ℓ.
        bit_table: (2^H, H) from :func:`make_bit_table`.
        generator: draws the uniforms (deterministic evaluation); None = ``torch.rand_like``.

    Returns:
        (Z (B, T, 2^H) fp32, index (B, T) int64).
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()  # (B, T, H)
        p = torch.sigmoid(logits)  # (B, T, H)
        if generator is None:
            u = torch.rand_like(p)  # (B, T, H)
        else:
            u = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)  # (B, T, H)
        bits = (u < p).long()  # (B, T, H)
        index = (bits << torch.arange(logits.shape[-1], device=logits.device)).sum(dim=-1)  # (B, T)
        y = F.one_hot(index, bit_table.shape[0]).float()  # (B, T, 2^H)
        table = bit_table.float()  # (2^H, H)
        log_g = F.logsigmoid(logits) @ table.T + F.logsigmoid(-logits) @ (1 - table).T  # (B, T, 2^H)
        g = log_g.exp()  # (B, T, 2^H)
        return y + (g - g.detach()), index  # (B, T, 2^H), (B, T)


# ---------------------------------------------------------------------------------------------
# Model


class FreeTransformer(LanguageModel):
    """Llama decoder with a per-token latent injected after block ``m`` (Free Transformer).

    Training/evaluation forward: embed -> ``blocks[:m]`` -> X_mid (B, T, d); ``encoder`` (a
    non-causal :class:`Block`) with queries ``zeta`` expanded to (B, T, d) and keys/values X_mid;
    ``readout`` -> bit logits ℓ (B, T, H) fp32; :func:`binary_mapper` -> Z (B, T, 2^H), exactly
    one-hot (training: ``torch.rand_like``; eval mode: a generator seeded 0 per forward, so
    evaluation is deterministic); ``R = latent_proj(Z)`` (B, T, d); ``blocks[m]`` with queries
    from X_mid and keys/values from X_mid + R; ``blocks[m+1:]``, final norm, head.

    Decoding (inside :meth:`decoding`, or whenever a cache is given): no encoder; each position's
    latent index is uniform on [0, 2^H), drawn once per position from a tape seeded by
    ``decoding(seed=...)`` and reused, so a full forward and cached decoding agree and the model
    is causal. With a cache outside :meth:`decoding` the new positions' indices come from the
    global RNG. ``R = latent_proj.weight.T[index]`` (the same values as ``latent_proj(one_hot)``).

    Loss (with targets, outside decoding): ``ce + kl_weight · mean_t max(0, KL_t − κ)`` with
    ``KL_t`` from :func:`kl_to_uniform` (nats) and ``κ = free_bits · ln 2`` (``free_bits`` is in
    bits per token). The mean runs over all B·T positions. ``parts``: ``ce`` (nats/token), ``kl``
    (mean KL_t, nats/token). ``stats``: ``kl_bits`` (mean KL_t in bits/token), ``at_floor`` (share
    of tokens with KL_t <= κ), ``kl_weight`` (current weight). ``extra_nats`` = KL_t (B, T), so
    evaluation reports CE + KL, an upper bound on the NLL. In decoding only ``ce``.

    Schedules: :meth:`set_progress` sets the non-persistent buffers ``kl_weight_now`` /
    ``free_bits_now`` from ``cfg.free`` (a curriculum ``kl_weight`` override wins), in place.

    Init: as :class:`~tfkit.models.llama.Llama` (every Linear/Embedding ~ N(0, init_std),
    ``attn.wo`` / ``ffn.w2`` ~ N(0, init_std / sqrt(2 n_layers)), the encoder's included; norm
    gains 1); ``zeta`` ~ N(0, init_std); ``readout`` ~ N(0, init_std), so ℓ ≈ 0 and KL ≈ 0 at
    start; ``latent_proj`` ~ N(0, init_std), like an embedding table of the 2^H latent values
    (the same scale as the token embedding, so the latent starts small but not absent).

    Args:
        cfg: model shape with ``arch="free"``; ``cfg.free.latent_bits`` H (resolved by the config),
            ``kl_weight``, ``free_bits`` (schedules), ``inject_layer`` m (None = n_layers // 2).
        attention: ``"sdpa"``, ``"flash"`` or ``"eager"`` (the encoder always uses masked SDPA).
        grad_checkpointing: recompute each block (and the encoder) in backward while training.

    Raises:
        ValueError: ``cfg.vocab_size`` is None, ``cfg.free`` is missing, the injection layer is
            not in [1, n_layers), or the attention backend is unknown.
    """

    def __init__(self, cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.free is None or cfg.free.latent_bits is None:
            raise ValueError("FreeTransformer needs cfg.free with latent_bits; build the config with arch='free'")
        fc = cfg.free
        m = cfg.n_layers // 2 if fc.inject_layer is None else fc.inject_layer
        if not 1 <= m < cfg.n_layers:
            raise ValueError(f"model.free.inject_layer={m} must lie in [1, n_layers={cfg.n_layers})")
        self._init_trunk(cfg, attention, grad_checkpointing)
        self.latent_bits = fc.latent_bits
        self.inject_layer = m
        d, n_latents = cfg.d_model, 2**fc.latent_bits
        self.encoder = Block(cfg, 0, attention)  # never given a cache; layer index unused
        self.zeta = nn.Parameter(torch.empty(d))  # (d,)
        self.readout = nn.Linear(d, fc.latent_bits, bias=False)
        self.latent_proj = nn.Linear(n_latents, d, bias=False)
        self.register_buffer("bit_table", make_bit_table(fc.latent_bits), persistent=False)  # (2^H, H)
        kl_weight, free_bits = schedule_at(fc.kl_weight, 0), schedule_at(fc.free_bits, 0)
        self.register_buffer("kl_weight_now", torch.tensor(kl_weight, dtype=torch.float32), persistent=False)  # ()
        self.register_buffer("free_bits_now", torch.tensor(free_bits, dtype=torch.float32), persistent=False)  # ()
        self._tape: Optional[Tensor] = None  # (B, n) latent indices drawn so far in decoding()
        self._tape_gen: Optional[torch.Generator] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise every weight as described in the class docstring."""
        super().reset_parameters()
        std = self.config.init_std
        nn.init.normal_(self.zeta, mean=0.0, std=std)

    # -- schedules and decoding state ---------------------------------------------------------

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the constant buffers (after :meth:`LanguageModel.materialize`): the bit table
        and the step-0 KL weight and free bits."""
        self.bit_table.copy_(make_bit_table(self.latent_bits))
        self.set_progress(0)

    def set_progress(self, step: int, overrides: Mapping[str, float] = {}) -> None:
        """Set the KL weight and free bits for optimizer step ``step`` (in place, no recompiles).

        ``kl_weight`` = ``overrides["kl_weight"]`` when the curriculum phase sets it, else
        ``cfg.free.kl_weight`` at ``step``; ``free_bits`` (bits/token) = ``cfg.free.free_bits`` at ``step``.
        """
        fc = self.config.free
        kl_weight = overrides["kl_weight"] if "kl_weight" in overrides else schedule_at(fc.kl_weight, step)
        self.kl_weight_now.fill_(float(kl_weight))
        self.free_bits_now.fill_(schedule_at(fc.free_bits, step))

    def _start_decoding(self, seed: Optional[int]) -> None:
        """Start an empty tape of prior latent indices, drawn from a generator seeded ``seed``."""
        gen = torch.Generator(device=self.embed.weight.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        self._tape_gen, self._tape = gen, None

    def _end_decoding(self) -> None:
        """Drop the tape."""
        self._tape_gen, self._tape = None, None

    def _prior_indices(self, b: int, start: int, t: int, device: torch.device) -> Tensor:
        """Uniform latent indices for positions ``start .. start+t-1`` of a batch of b.

        Inside :meth:`decoding` they come from the tape, so every position keeps its draw across
        forwards. The tape grows on demand by whole chunks of ``context_length`` positions, each
        one ``randint`` of shape (b, context_length): the random stream then does not depend on how
        forwards split the positions (CUDA generators are not prefix-consistent across draw
        sizes). A new batch size starts a fresh tape (continuing the generator). Outside (a cache
        without decoding mode) they are fresh draws from the global RNG.

        Returns:
            (b, t) int64 in [0, 2^H).
        """
        n_latents = 2**self.latent_bits
        if self._tape_gen is None:
            return torch.randint(0, n_latents, (b, t), device=device)  # (B, T)
        if self._tape is None or self._tape.shape[0] != b:
            self._tape = torch.zeros(b, 0, dtype=torch.long, device=device)  # (B, 0)
        chunk = self.context_length
        while self._tape.shape[1] < start + t:  # whole chunks: same draws however forwards split positions
            gen = self._tape_gen
            new = torch.randint(0, n_latents, (b, chunk), generator=gen, device=gen.device)  # (B, chunk)
            self._tape = torch.cat([self._tape, new.to(device)], dim=1)  # (B, n + chunk)
        return self._tape[:, start : start + t].to(device)  # (B, T)

    # -- forward ------------------------------------------------------------------------------

    def _encode(self, x_mid: Tensor, cos: Tensor, sin: Tensor, ckpt: bool) -> Tensor:
        """Bit logits ℓ (B, T, H) fp32 from the non-causal encoder over X_mid (B, T, d)."""
        b, t, d = x_mid.shape
        queries = self.zeta.to(x_mid.dtype).expand(b, t, d)  # (B, T, d)
        if ckpt:
            e = checkpoint(self.encoder, queries, cos, sin, None, x_mid, False, use_reentrant=False)  # (B, T, d)
        else:
            e = self.encoder(queries, cos, sin, kv=x_mid, causal=False)  # (B, T, d)
        return self.readout(e).float()  # (B, T, H)

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ids (B, T) int64 -> ModelOutput(logits (B, T, V), loss, parts, stats, extra_nats).

        See the class docstring for the two modes (encoder-inferred latent vs prior latent) and
        the outputs. With a cache, positions start at ``cache.length`` and the cache grows by T.

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        b, t = ids.shape[0], ids.shape[-1]
        start = 0 if cache is None else cache.length
        x, cos, sin = self._embed(ids, targets, cache)  # (B, T, d), (T, D/2) x 2
        decoding = self.decode_mode or cache is not None
        ckpt = self._checkpointing(cache)
        m = self.inject_layer

        for block in self.blocks[:m]:
            x = self._block(block, x, cos, sin, cache, ckpt)  # (B, T, d)

        kl = None
        if decoding:
            index = self._prior_indices(b, start, t, x.device)  # (B, T)
            r = self.latent_proj.weight.T[index]  # (B, T, d), = latent_proj(one_hot(index))
        else:
            logits_bits = self._encode(x, cos, sin, ckpt)  # (B, T, H) fp32
            gen = None
            if not self.training:
                gen = torch.Generator(device=x.device)
                gen.manual_seed(0)
            z, _ = binary_mapper(logits_bits, self.bit_table, gen)  # (B, T, 2^H)
            r = self.latent_proj(z)  # (B, T, d)
            kl = kl_to_uniform(logits_bits)  # (B, T) nats
        kv = x + r.to(x.dtype)  # (B, T, d)
        block = self.blocks[m]
        if ckpt:
            x = checkpoint(block, x, cos, sin, None, kv, use_reentrant=False)  # (B, T, d)
        else:
            x = block(x, cos, sin, cache, kv=kv)  # (B, T, d)
        for block in self.blocks[m + 1 :]:
            x = self._block(block, x, cos, sin, cache, ckpt)  # (B, T, d)
        logits = self._logits(x, cache)  # (B, T, V)

        extra = None if kl is None else kl.detach()  # (B, T) nats
        if targets is None:
            return ModelOutput(logits=logits, extra_nats=extra)
        ce = cross_entropy(logits, targets)  # scalar, nats/token
        if kl is None:
            return ModelOutput(logits=logits, loss=ce, parts={"ce": ce.detach()})
        kappa = self.free_bits_now.float() * LN2  # nats/token
        kl_term = (kl - kappa).clamp_min(0).mean()  # scalar, nats/token
        weight = self.kl_weight_now.float()
        loss = ce + weight * kl_term
        kl_mean = kl.detach().mean()
        parts = {"ce": ce.detach(), "kl": kl_mean}
        stats = {
            "kl_bits": kl_mean / LN2,
            "at_floor": (kl.detach() <= kappa).float().mean(),
            "kl_weight": weight.detach().clone(),
        }
        return ModelOutput(logits=logits, loss=loss, parts=parts, stats=stats, extra_nats=extra)
