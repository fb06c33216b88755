"""The interface every tfkit model variant provides, and the output type of its forward pass.

The training loop never branches on the variant: a variant folds its extra loss terms into
:class:`ModelOutput` (``loss`` plus named ``parts``, and ``stats``) and the loop logs whatever
it is given.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from tfkit.config import CE_CHUNK_ELEMENTS, ModelConfig
from tfkit.errors import CheckpointError
from tfkit.models.layers import Block, KVCache, RMSNorm, RotaryEmbedding

RESIDUAL_PROJECTIONS = ("attn.wo.weight", "ffn.w2.weight")
"""Suffixes of the weights initialised with the scaled std ``init_std / sqrt(2 * n_layers)``."""


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats/token over targets != -1, computed in fp32.

    Large logits (more than :data:`CE_CHUNK_ELEMENTS`, e.g. a 50k vocabulary at batch 16 x 1024)
    are upcast one chunk of rows at a time under activation checkpointing, so the fp32 copy, its
    log-softmax and their gradients exist for one chunk only instead of the whole batch (the logits
    themselves stay in the compute dtype).

    A batch whose targets are all -1 (a window of conversation data with no assistant token) gives 0
    with zero gradients, not NaN.

    Shapes:
        logits (B, T, V), targets (B, T) int64 -> scalar.
    """
    flat, tgt = logits.flatten(0, 1), targets.flatten()  # (B*T, V), (B*T,)
    count = (tgt != -1).sum().clamp(min=1)  # () int64
    if flat.numel() <= CE_CHUNK_ELEMENTS or not torch.is_grad_enabled():
        return F.cross_entropy(flat.float(), tgt, ignore_index=-1, reduction="sum") / count
    rows = max(1, CE_CHUNK_ELEMENTS // flat.shape[1])
    total = flat.new_zeros((), dtype=torch.float32)
    for i in range(0, flat.shape[0], rows):
        total = total + torch.utils.checkpoint.checkpoint(_ce_sum, flat[i:i + rows], tgt[i:i + rows], use_reentrant=False)
    return total / count


def _ce_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed fp32 cross-entropy of a chunk: (N, V), (N,) -> scalar."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="sum")


@dataclass
class ModelOutput:
    """What a model's forward returns.

    Attributes:
        logits: (B, T, V) next-token scores, in the compute dtype.
        loss: scalar the optimizer minimises, or None without targets. For llama it is the
            mean cross-entropy over non-ignored targets in nats/token, computed in fp32.
        parts: named loss terms as detached fp32 scalars; at least ``"ce"`` (nats/token) when
            targets are given.
        stats: variant statistics as floats or detached 0-dim tensors (router capacity, KL,
            Amax...); empty for llama. The training loop averages them over micro-batches and
            evaluation averages them over batches, so keep them batch-size independent.
        extra_nats: (B, T) nats per position that a likelihood bound adds to the cross-entropy of
            ``logits`` (the Free Transformer's per-token KL: CE + KL bounds the NLL); None for
            models whose logits give the likelihood directly. Evaluation adds it before
            computing loss, perplexity and bits per byte.
    """

    logits: Tensor
    loss: Optional[Tensor] = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float | Tensor] = field(default_factory=dict)
    extra_nats: Optional[Tensor] = None


class LanguageModel(nn.Module):
    """Common interface of every decoder-only variant (see ``tfkit.models.REGISTRY``).

    The trunk every variant shares is written here once (torchtitan's ``models/common/decoder.py``
    is the model): :meth:`_init_trunk` makes ``embed``, ``rope``, ``blocks``, ``norm`` and ``head``;
    a forward is ``x, cos, sin = self._embed(...)``, the variant's own walk over the blocks (with
    :meth:`_block` for a plain one), then ``logits = self._logits(x, cache)`` and the loss. So the
    vocabulary check, RoPE layout and scaling, attention biases and the checkpointing idiom exist
    once. Subclasses implement :meth:`forward` and add only what differs.

    Checkpoints: :meth:`state_dict_for_save` gives a dict that ``safetensors.torch.save_file``
    accepts (one key per storage: with tied embeddings only ``embed.weight`` exists, there is no
    ``head.weight``), and :meth:`load_state_dict_from_save` loads it back strictly.
    """

    config: ModelConfig
    context_length: int
    decode_mode: bool = False
    """True inside :meth:`decoding`: routers decide token by token, latents come from the prior."""

    @contextlib.contextmanager
    def decoding(self, seed: Optional[int] = None) -> Iterator["LanguageModel"]:
        """Run the model as generation does, for the body of the ``with`` block.

        Inside, every forward (with or without a KV cache) behaves causally: MoD and DTF route each
        token with their causal router instead of top-k over the sequence, and the Free
        Transformer draws its latent Z for each position from the uniform prior once and reuses it
        (seeded by ``seed``), so cached and uncached decoding agree. Llama and mHC are causal
        anyway and do not change.
        """
        previous = self.decode_mode
        self.decode_mode = True
        self._start_decoding(seed)
        try:
            yield self
        finally:
            self._end_decoding()
            self.decode_mode = previous

    def _start_decoding(self, seed: Optional[int]) -> None:
        """Hook for variants with decode-time state (the Free Transformer's latent draws)."""

    def _end_decoding(self) -> None:
        """Hook run when :meth:`decoding` ends."""

    def set_progress(self, step: int, overrides: Mapping[str, float] = {}) -> None:
        """Told by the training loop before each optimizer step; a no-op for most variants.

        Args:
            step: the 0-based optimizer step about to run (drives schedules such as the Free
                Transformer's KL annealing).
            overrides: settings of the current ``train.curriculum`` phase (e.g. ``kl_weight``).
        """

    def forward(self, ids: Tensor, targets: Optional[Tensor] = None, cache: Optional[KVCache] = None) -> ModelOutput:
        """Next-token logits, and the loss when targets are given.

        Args:
            ids: (B, T) int64 token ids.
            targets: (B, T) int64 next-token ids; -1 marks positions to ignore.
            cache: when given, positions continue from ``cache.length`` and the cache is
                extended in place by T.

        Returns:
            :class:`ModelOutput` with logits (B, T, V).

        Raises:
            ValueError: bad shapes, or the cache has no room for T more tokens.
        """
        raise NotImplementedError

    def new_cache(
        self,
        batch_size: int,
        max_len: Optional[int] = None,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> KVCache:
        """An empty KV cache: per layer K, V of shape (batch_size, n_kv_heads, max_len, head_dim).

        Routed layers (MoD, DTF) add their key masks and per-position state on first write.

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
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, max_len or self.context_length, cfg.head_size, device, dtype)

    def materialize(self, device: torch.device | str = "cpu") -> "LanguageModel":
        """Give a model built on the meta device (``build_model(cfg, device="meta")``) storage on
        ``device`` and recompute its constant buffers (each module's ``init_buffers``: RoPE
        tables, the Free Transformer's bit table). The weights stay uninitialised: load them (a
        strict load checks that every one is set) or call :meth:`reset_parameters`. Loading a
        checkpoint this way skips the random init (about 10 s for 0.5B parameters on a CPU) and
        never holds a second copy of the weights.

        Returns:
            self.
        """
        self.to_empty(device=device)
        for module in self.modules():
            init = getattr(module, "init_buffers", None)
            if init is not None:
                init()
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 / nanoGPT init (arXiv 2005.14165 §2.3): every Linear and Embedding weight
        ~ N(0, init_std), the residual output projections (attention ``wo``, FFN ``w2``)
        ~ N(0, init_std / sqrt(2 * n_layers)), RMSNorm gains 1. Variants re-initialise their
        own extra parameters after calling this."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = any(f"{name}.weight".endswith(s) for s in RESIDUAL_PROJECTIONS)
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std)
                if getattr(module, "bias", None) is not None:  # attention_bias: q/k/v start unbiased
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def output_weight(self) -> Tensor:
        """The (V, d) matrix the logits are computed with: ``embed.weight`` when the head is tied."""
        head = getattr(self, "head", None)
        return self.embed.weight if head is None else head.weight

    # -- the shared trunk ----------------------------------------------------------------------

    def _init_trunk(self, cfg: ModelConfig, attention: str, grad_checkpointing: bool) -> None:
        """Make the shared parts, in this order: ``embed`` (V, d), ``rope`` (RoPE tables of head
        width D, with ``rope_scaling``), ``blocks`` (``n_layers`` :class:`Block`), ``norm`` and
        ``head`` (V, d; None when the embedding is tied). Variants add their own modules after.

        Raises:
            ValueError: ``cfg.vocab_size`` is None, or the attention backend is unknown.
        """
        if cfg.vocab_size is None:
            raise ValueError(f"{type(self).__name__} needs cfg.vocab_size; set model.vocab_size or give a tokenizer")
        self.config = cfg
        self.context_length = cfg.context_length
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_size, cfg.context_length, cfg.rope_theta, cfg.rope_scaling)
        self.blocks = nn.ModuleList(Block(cfg, i, attention) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _embed(self, ids: Tensor, targets: Optional[Tensor], cache: Optional[KVCache]) -> tuple[Tensor, Tensor, Tensor]:
        """Start of a forward: check the inputs, reserve cache room, and return the token embeddings
        x (B, T, d) with the RoPE tables cos, sin (T, D/2) of positions ``cache.length ..`` (or 0..).

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        _, t, start = self._begin(ids, targets, cache)
        cos, sin = self.rope(start, t)  # (T, D/2) each
        return self.embed(ids), cos, sin  # (B, T, d)

    def _block(self, block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[KVCache],
               ckpt: bool) -> Tensor:
        """One plain block, recomputed in backward when ``ckpt`` (:meth:`_checkpointing`):
        x (B, T, d) -> (B, T, d)."""
        if ckpt:
            return torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)  # (B, T, d)
        return block(x, cos, sin, cache)  # (B, T, d)

    def _logits(self, x: Tensor, cache: Optional[KVCache]) -> Tensor:
        """End of the trunk: mark the T new positions written in ``cache``, apply the final norm and
        the head. x (B, T, d) -> logits (B, T, V) in the compute dtype."""
        if cache is not None:
            cache.advance(x.shape[1])
        return F.linear(self.norm(x), self.output_weight)  # (B, T, V)

    def _begin(self, ids: Tensor, targets: Optional[Tensor], cache: Optional[KVCache]) -> tuple[int, int, int]:
        """Check a forward's inputs and reserve cache room: returns (B, T, first position).

        Raises:
            ValueError: ids is not 2-D, targets' shape differs, or the cache has no room.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, time), got shape {tuple(ids.shape)}")
        b, t = ids.shape
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != ids shape {tuple(ids.shape)}")
        if cache is None:
            return b, t, 0
        cache.check_room(b, t)
        return b, t, cache.length

    def _checkpointing(self, cache: Optional[KVCache]) -> bool:
        """Whether this forward recomputes blocks in backward (training, no cache, grad on)."""
        return bool(getattr(self, "grad_checkpointing", False)) and self.training and cache is None \
            and torch.is_grad_enabled()

    # -- shared helpers -----------------------------------------------------------------------

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards one by one (``fully_shard``; arXiv 2304.11277), each gathered
        just before its ``forward`` runs: the blocks. A variant that calls parts of a block directly
        instead of the block's ``forward`` lists those parts."""
        return list(getattr(self, "blocks", []))

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, shared storage counted once.

        Args:
            non_embedding: leave out the token embedding table ``embed.*`` (with a tied head
                this also leaves out the head, which is the same matrix).
        """
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (non_embedding and name.startswith("embed.")):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def flops_per_token(self, context_length: Optional[int] = None) -> float:
        """Training FLOPs per token: ``6N + 12 L d T`` (PaLM, arXiv 2204.02311, appendix B).

        N counts the weights used in matmuls: every parameter but the embedding lookup, plus
        the head (counted even when tied to the embedding). T defaults to ``context_length``.
        Forward + backward; multiply by tokens/s to get FLOP/s for MFU.
        """
        cfg = self.config
        t = self.context_length if context_length is None else context_length
        n = self.num_params(non_embedding=True)
        if cfg.tie_embeddings:
            n += self.embed.weight.numel()
        return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * t

    def _aliases(self) -> dict[str, str]:
        """State-dict keys that name the same tensor as an earlier key -> that earlier key."""
        first: dict[tuple, str] = {}
        out: dict[str, str] = {}
        for name, t in self.state_dict(keep_vars=True).items():
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else (name,)
            if key in first:
                out[name] = first[key]
            else:
                first[key] = name
        return out

    def state_dict_for_save(self) -> dict[str, Tensor]:
        """Parameters (and persistent buffers) as detached, contiguous tensors keyed by name.

        A tensor reachable under two names is saved under the first only, and any other
        tensor sharing storage is copied, so ``safetensors.torch.save_file`` accepts the dict.
        Llama with tied embeddings has a single key anyway (``embed.weight``, no ``head.weight``).
        """
        aliases = self._aliases()
        out: dict[str, Tensor] = {}
        storages: set[int] = set()
        for name, t in self.state_dict().items():
            if name in aliases:
                continue
            t = t.detach()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            if ptr is not None and ptr in storages:
                t = t.clone()
            elif ptr is not None:
                storages.add(ptr)
            out[name] = t.contiguous()
        return out

    def load_state_dict_from_save(self, tensors: dict[str, Tensor]) -> None:
        """Load what :meth:`state_dict_for_save` produced (e.g. from ``safetensors.torch.load_file``).

        Strict: every key must match by name and shape (aliases of a saved tensor may be
        absent). Values are copied into the existing parameters, so tied weights stay tied.

        Raises:
            CheckpointError: missing, unexpected or mis-shaped tensors (naming the first few).
        """
        own = self.state_dict()
        aliases = self._aliases()
        missing = sorted(k for k in set(own) - set(tensors) if k not in aliases)
        unexpected = sorted(set(tensors) - set(own))
        shapes = [f"{k} {tuple(tensors[k].shape)} != {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        problems = []
        if missing:
            problems.append(f"missing {few(missing)}")
        if unexpected:
            problems.append(f"unexpected {few(unexpected)}")
        if shapes:
            more = f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""
            problems.append("shape mismatch " + "; ".join(shapes[:3]) + more)
        if problems:
            raise CheckpointError(
                "model weights do not fit this model: " + "; ".join(problems),
                "load the checkpoint with the config it was trained with (the run's `config.yaml`)",
            )
        full = dict(tensors)
        for alias, target in aliases.items():
            full.setdefault(alias, tensors[target])
        self.load_state_dict(full, strict=True)
