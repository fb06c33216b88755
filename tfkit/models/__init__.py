"""Model variants and the one way to build one: :func:`build_model`.

``REGISTRY`` is an explicit dict from ``model.arch`` to the model class; adding a variant is
one config class, one model file and one line here. A test walks every entry.
"""

from __future__ import annotations

from typing import Optional

import torch

from tfkit.config import ModelConfig
from tfkit.errors import ConfigError
from tfkit.models.base import LanguageModel, ModelOutput
from tfkit.models.layers import ATTENTION_BACKENDS, KVCache
from tfkit.models.dtf import DynamicTransformer
from tfkit.models.free import FreeTransformer
from tfkit.models.llama import Llama
from tfkit.models.mhc import HyperConnectionTransformer
from tfkit.models.mod import MixtureOfDepths

REGISTRY: dict[str, type] = {
    "llama": Llama,
    "mod": MixtureOfDepths,
    "dtf": DynamicTransformer,
    "free": FreeTransformer,
    "mhc": HyperConnectionTransformer,
}
"""``model.arch`` -> model class (each a :class:`~tfkit.models.base.LanguageModel`)."""

__all__ = ["REGISTRY", "build_model", "LanguageModel", "ModelOutput", "KVCache", "Llama", "MixtureOfDepths",
           "DynamicTransformer", "FreeTransformer", "HyperConnectionTransformer"]


def build_model(cfg: ModelConfig, attention: str = "sdpa", grad_checkpointing: bool = False,
                device: Optional[str] = None) -> LanguageModel:
    """Build the model ``cfg.arch`` names, freshly initialised in fp32.

    On an accelerator (``device`` ``cuda``/``mps``) the tensors are created and initialised there
    (a ``torch.device`` context): no host copy of the weights, and the init runs on the device's
    random generator. On the CPU (default) the weights are those of every earlier tfkit version.
    On ``"meta"`` nothing is allocated: call :meth:`LanguageModel.materialize` and load weights.

    Args:
        cfg: the model section of a resolved config; ``vocab_size`` must be set.
        attention: resolved backend, ``"sdpa"``, ``"flash"`` or ``"eager"`` (``tfkit.hardware``
            turns ``auto`` into one of these).
        grad_checkpointing: recompute block activations in backward (training only).

    Raises:
        ConfigError: ``vocab_size`` unset, unknown arch, or unknown attention backend.
    """
    if cfg.vocab_size is None:
        raise ConfigError("`model.vocab_size` is not set", "set model.vocab_size or give a tokenizer")
    if cfg.arch not in REGISTRY:
        raise ConfigError(f"unknown model.arch {cfg.arch!r}", f"choose one of: {', '.join(REGISTRY)}")
    if attention not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"unknown attention backend {attention!r}", f"choose one of: {', '.join(ATTENTION_BACKENDS)}"
        )
    if device is None or torch.device(device).type == "cpu":
        return REGISTRY[cfg.arch](cfg, attention=attention, grad_checkpointing=grad_checkpointing)
    with torch.device(device):
        return REGISTRY[cfg.arch](cfg, attention=attention, grad_checkpointing=grad_checkpointing)
