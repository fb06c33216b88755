"""Tiny random Hugging Face models, built offline with `transformers` itself, with a small BPE
tokenizer trained on a Shakespeare play, and a way to run the CLI: helpers of the import/export tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


CORPUS = Path(__file__).resolve().parents[2].parent / "shared/corpora/shakespeare"
VOCAB = 448
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def hf_config(family: str):
    """A transformers config of each family the import supports (and a few shapes within them)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": lambda: LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=1),
        "llama3": lambda: LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True,
                                      rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
        "qwen2": lambda: Qwen2Config(**SHAPE, eos_token_id=0, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=32, eos_token_id=0),
        "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None, bos_token_id=0, eos_token_id=1),
    }[family]()


def bpe_tokenizer(specials: list[str]):
    """A byte-level BPE (HF `tokenizers`) trained on Macbeth, its special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([(CORPUS / "macbeth.txt").read_text()], trainer)
    return tok


def save_hf_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model with a tokenizer: Llama-style families use ``<s>``/``</s>``,
    Qwen-style ``<|endoftext|>``/``<|im_end|>`` (so no special token is hard-coded in tfkit).
    Norm gains and biases are randomised too, so a wrong mapping of any tensor shows in the logits."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    if family.startswith("qwen"):
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                      eos_token="<|endoftext|>")
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(["<s>", "</s>"]), eos_token="</s>", bos_token="<s>")
    tok.save_pretrained(folder)
    return folder


def tfkit(args, home, timeout=300, env=None):
    """Run the CLI in a fresh process (as a user would)."""
    e = {**os.environ, "TFKIT_HOME": str(home), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tfkit", *map(str, args)], capture_output=True, text=True, env=e,
                          timeout=timeout)


def json_out(result) -> dict:
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)
