"""Byte-level BPE tokenizer (HF ``tokenizers``) with an end-of-text token and chat-role tokens.

Byte-level BPE as in GPT-2 (Radford et al., 2019): text is mapped to bytes, each byte to one of 256
printable characters (``ByteLevel.alphabet()``), and BPE merges are learned over those; so every UTF-8
string round-trips exactly (``decode(encode(s)) == s``) and no input is ever out of vocabulary.

Ids 0-4 are the special tokens in :data:`SPECIAL_TOKENS`; ``<|endoftext|>`` (id 0) ends every
document in a token file. The saved file is the ordinary ``tokenizer.json`` of HF ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from tfkit.errors import DataError
from tfkit.fsutil import write_text_atomic

EOT = "<|endoftext|>"
"""End-of-text token: separates documents; id 0 in tokenizers trained here."""
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
"""Token that opens a message of each chat role."""
END_OF_MESSAGE = "<|end|>"
"""Token that closes every chat message."""
SPECIAL_TOKENS = [EOT, "<|system|>", "<|user|>", "<|assistant|>", END_OF_MESSAGE]
"""Special tokens, in id order (0..4) for tokenizers trained by :meth:`Tokenizer.train`."""
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""Smallest vocabulary: the 256 byte tokens plus the special tokens."""
MAX_VOCAB_SIZE = 1 << 20
"""Largest vocabulary :meth:`Tokenizer.train` accepts."""


def render_conversation(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render chat messages as text with role tokens, e.g. ``<|user|>\\nHi<|end|>\\n``.

    Each message is ``{"role": "system" | "user" | "assistant", "content": str}``; it becomes
    ``<|role|>`` + newline + content + ``<|end|>`` + newline. The role and end tokens are special
    tokens, so :meth:`Tokenizer.encode` turns each into a single id.

    Args:
        messages: the conversation, in order.
        add_generation_prompt: append ``<|assistant|>\\n`` so a model continues as the assistant.

    Raises:
        DataError: a message is not an object, has an unknown role, or its content is not a string.
    """
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"`messages` must be a list of {{role, content}} objects, got {type(messages).__name__}",
                        'write messages as [{"role": "user", "content": "…"}, …]')
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"messages[{i}] is not an object", 'write each message as {"role": "user", "content": "…"}')
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLE_TOKENS:
            raise DataError(f"messages[{i}] has role {role!r}, expected one of {', '.join(ROLE_TOKENS)}",
                            "rename the role to system, user or assistant")
        if not isinstance(content, str):
            raise DataError(f"messages[{i}] content is {type(content).__name__}, not a string",
                            'give each message a text "content"')
        parts.append(f"{ROLE_TOKENS[role]}\n{content}{END_OF_MESSAGE}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: ByteLevel alphabet character → byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


METASPACE = "\u2581"
"""SentencePiece's visible space ``▁``."""
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _is_metaspace(raw_json: str) -> bool:
    """Whether a tokenizer.json is SentencePiece-style (Metaspace / ``▁`` replacement, byte
    fallback) rather than byte-level BPE."""
    spec = json.loads(raw_json)
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")])
    return "ByteLevel" not in text and ("Metaspace" in text or METASPACE in text or
                                        bool((spec.get("model") or {}).get("byte_fallback")))


@dataclass(frozen=True)
class SpecialTokens:
    """A Hugging Face model's special tokens, as its ``tokenizer_config.json`` and
    ``generation_config.json`` name them (all empty for tokenizers trained by tfkit).

    Attributes:
        eos: the end-of-text token string (``eos_token``), e.g. ``<|endoftext|>`` or ``</s>``.
        bos: the begin-of-text token string (``bos_token``), or None (Qwen has none).
        stop_ids: ids that end generation (``eos_token_id`` of generation_config.json, an int or a list).
        chat_template: the Jinja ``chat_template`` (the ``default`` one of a list), or None.
    """

    eos: Optional[str] = None
    bos: Optional[str] = None
    stop_ids: tuple[int, ...] = ()
    chat_template: Optional[str] = None

    @classmethod
    def beside(cls, tokenizer_json: Path, tok: Any = None) -> "SpecialTokens":
        """Read the files next to ``tokenizer.json``; missing files or fields are left empty.

        Raises:
            DataError: one of the files is not valid JSON.
        """
        folder = Path(tokenizer_json).parent
        cfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")
        ids = gen.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(eos=_token_name(cfg.get("eos_token")), bos=_token_name(cfg.get("bos_token")),
                   stop_ids=tuple(int(i) for i in ids if isinstance(i, int)),
                   chat_template=template if isinstance(template, str) and template else None)


SIDECAR_FILES = ("tokenizer_config.json", "generation_config.json")
"""Files beside a Hugging Face ``tokenizer.json`` that name its special tokens."""


def copy_tokenizer(src: Union[str, os.PathLike], folder: Union[str, os.PathLike]) -> Path:
    """Copy ``src`` to ``folder/tokenizer.json`` with the :data:`SIDECAR_FILES` beside it, if any.

    Returns:
        the new tokenizer.json path.
    """
    import shutil

    src, folder = Path(src), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / "tokenizer.json")
    for name in SIDECAR_FILES:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, folder / name)
    return folder / "tokenizer.json"


def _token_name(value: Any) -> Optional[str]:
    """``"</s>"`` or ``{"content": "</s>", ...}`` (older tokenizer_config.json) -> ``"</s>"``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"`{path}` is not valid JSON ({exc})", "fix or delete the file") from None
    return data if isinstance(data, dict) else {}


def _canonical_hash(raw_json: str) -> str:
    canonical = json.dumps(json.loads(raw_json), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Tokenizer:
    """A byte-level BPE tokenizer with tfkit's special tokens.

    Build one with :meth:`train` or :meth:`load`.

    Attributes:
        vocab_size: number of ids (``max id + 1``), special tokens included.
        eot_id: id of the end-of-text token that ends every document: ``<|endoftext|>`` for
            tokenizers trained here, the model's own ``eos_token`` for an imported one.
        bos_id: id prepended to a prompt: the model's ``bos_token`` (Llama's ``<s>`` or
            ``<|begin_of_text|>``), else ``eot_id``.
        stop_ids: ids that end generation: ``eot_id`` and the ``eos_token_id`` list of a
            ``generation_config.json`` (Llama 3's ``<|eot_id|>``, Qwen's ``<|im_end|>``).
        hash: sha256 hex of the canonical tokenizer JSON (sorted keys, compact); identical after
            save and load, and written into every token file this tokenizer makes.
    """

    def __init__(self, tok: Any, special: Optional["SpecialTokens"] = None) -> None:
        self._tok = tok
        self.vocab_size: int = int(tok.get_vocab_size(with_added_tokens=True))
        special = special or SpecialTokens()
        name = special.eos or EOT
        eot = tok.token_to_id(name)
        if eot is None:
            raise DataError(f"the tokenizer has no `{name}` token", "train one with `tfkit tokenize FILES… --out tokenizer.json`")
        self.eot_id: int = int(eot)
        bos = tok.token_to_id(special.bos) if special.bos else None
        self.bos_id: int = int(bos) if bos is not None else self.eot_id
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys([self.eot_id, *special.stop_ids]))
        self.special = special
        self.hash: str = _canonical_hash(tok.to_str())
        self._byte_lengths: Optional[np.ndarray] = None
        self._metaspace = _is_metaspace(tok.to_str())

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def train(
        cls,
        source: Union[Iterable[str], Sequence[Union[str, os.PathLike]]],
        vocab_size: int,
        min_frequency: int = 2,
        text_field: Optional[str] = None,
        on_progress: Optional[Callable[[int], None]] = None,
    ) -> "Tokenizer":
        """Train a byte-level BPE on texts or files.

        Args:
            source: either ``Path`` objects (files, folders or globs, expanded by
                :func:`tfkit.data.sources.expand_inputs` and read by ``iter_documents``), or an
                iterable of text strings. Plain ``str`` items are texts, not paths; use
                :meth:`train_files` for path strings.
            vocab_size: target number of ids (≥ 261: 256 bytes + 5 special tokens). A small corpus
                may yield fewer.
            min_frequency: a pair must occur this often to be merged.
            text_field: JSONL field holding the text (files only).
            on_progress: called with source bytes read since the previous call (files only).

        Raises:
            DataError: vocab_size out of range, no text in the input, or any input error from
                :mod:`tfkit.data.sources`.
        """
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if not MIN_VOCAB_SIZE <= int(vocab_size) <= MAX_VOCAB_SIZE:
            raise DataError(f"vocab size {vocab_size} is out of range ({MIN_VOCAB_SIZE} … {MAX_VOCAB_SIZE})",
                            f"pass `--vocab-size` of at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                            "tokens); 4096-32768 suits small corpora")
        items = list(source) if isinstance(source, (list, tuple)) else None
        if items is not None and items and all(isinstance(p, os.PathLike) for p in items):
            texts: Iterable[str] = _texts_of_files([str(p) for p in items], text_field, on_progress)
        elif items is not None:
            texts = items
        else:
            texts = source  # type: ignore[assignment]
        seen = {"chars": 0}

        def counted() -> Iterator[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise DataError(f"tokenizer training input must be text, got {type(t).__name__}",
                                    "pass strings, or Path objects for files")
                if t.strip():
                    seen["chars"] += len(t)
                yield t

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size), min_frequency=int(min_frequency), special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(counted(), trainer)
        if seen["chars"] == 0:
            raise DataError("no text to train the tokenizer on (the inputs are empty or whitespace only)",
                            "pass .txt or .jsonl files that contain text")
        return cls(tok)

    @classmethod
    def train_files(cls, paths: Sequence[Union[str, os.PathLike]], vocab_size: int, **kwargs: Any) -> "Tokenizer":
        """Like :meth:`train` on files, folders or globs given as strings or paths."""
        return cls.train([Path(p) for p in paths], vocab_size, **kwargs)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """Load a ``tokenizer.json``.

        A Hugging Face model's special tokens are read from the ``tokenizer_config.json`` and
        ``generation_config.json`` beside it when they exist (:class:`SpecialTokens`); otherwise
        the end-of-text token is ``<|endoftext|>``.

        Raises:
            DataError: the file is missing, is a folder, is not a tokenizer JSON, or has no
                ``<|endoftext|>`` token.
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        make = "train one with `tfkit tokenize FILES… --vocab-size 4096 --out tokenizer.json`"
        if not path.exists():
            raise DataError(f"tokenizer `{path}` does not exist", f"check the path, or {make}")
        if path.is_dir():
            raise DataError(f"tokenizer `{path}` is a folder", "pass the tokenizer.json file itself")
        if path.stat().st_size == 0:
            raise DataError(f"tokenizer `{path}` is empty", make)
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception with serde's message
            raise DataError(f"`{path}` is not a valid tokenizer file ({exc})", make) from None
        special = SpecialTokens.beside(path, tok)
        name = special.eos or EOT
        if tok.token_to_id(name) is None:
            raise DataError(f"tokenizer `{path}` has no `{name}` token", f"tfkit needs an end-of-text token; {make}")
        return cls(tok, special)

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``tokenizer.json`` atomically (temp file, fsync, rename). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, self._tok.to_str(pretty=True))

    def to_str(self) -> str:
        """The tokenizer JSON (as saved)."""
        return self._tok.to_str(pretty=True)

    # ----------------------------------------------------------------------------------- use
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special-token strings in it (e.g. ``<|user|>``) become their single ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, encoded in parallel (Rust threads)."""
        fast = getattr(self._tok, "encode_batch_fast", None)
        encs = (fast or self._tok.encode_batch)(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids of each text with each token's character span ``(start, end)`` in it (for the loss
        masks of conversations: a token belongs to the span its first character lies in)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.offsets) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (special tokens kept as their strings). Accepts lists, numpy arrays, tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # type: ignore[union-attr]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> Optional[str]:
        """The token string of id ``i`` (byte-level alphabet, e.g. ``Ġthe``), or None if unused."""
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    @property
    def special_ids(self) -> dict[str, int]:
        """Id of each special token present, e.g. ``{"<|endoftext|>": 0, "<|user|>": 2, …}``."""
        out = {}
        for t in SPECIAL_TOKENS:
            i = self._tok.token_to_id(t)
            if i is not None:
                out[t] = int(i)
        return out

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for: int32 array of shape ``(vocab_size,)``.

        0 for special tokens and unused ids; for byte-level tokens (GPT-2, Llama 3, Qwen) the number
        of characters of the token string (each ByteLevel alphabet character is one byte); for
        SentencePiece-style tokens (Llama 2, Mistral) the UTF-8 length with ``▁`` counted as the
        space it stands for and each byte-fallback token ``<0xNN>`` as one byte. Summing it over a token
        array gives the bytes of text it encodes (for bits per byte).
        """
        if self._byte_lengths is None:
            out = np.zeros(self.vocab_size, dtype=np.int32)
            added = self._tok.get_added_tokens_decoder()
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                if self._metaspace and _BYTE_TOKEN.match(token):  # byte fallback "<0x0A>": one byte
                    out[i] = 1
                elif i in added:
                    out[i] = 0 if added[i].special else len(token.encode("utf-8"))
                elif self._metaspace:  # SentencePiece style: "▁" is a space
                    out[i] = len(token.replace(METASPACE, " ").encode("utf-8"))
                else:
                    out[i] = len(token)
            out.setflags(write=False)
            self._byte_lengths = out
        return self._byte_lengths

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes id ``i`` stands for (a special token's UTF-8 string; ``b""`` if unused).

        Unlike ``decode([i])``, this shows the exact bytes of a token that holds part of a
        multi-byte character.
        """
        tok = self._tok.id_to_token(int(i))
        if tok is None:
            return b""
        if int(i) in self._tok.get_added_tokens_decoder() or any(c not in _BYTE_DECODER for c in tok):
            return tok.encode("utf-8")
        return bytes(_BYTE_DECODER[c] for c in tok)

    def newline_ids(self) -> np.ndarray:
        """Sorted ids whose text ends with a newline (byte-level ``Ċ``); used to cut at line ends."""
        ids = [i for t, i in self._tok.get_vocab(with_added_tokens=False).items() if t.endswith("\u010a")]
        return np.array(sorted(ids), dtype=np.int64)

    render_conversation = staticmethod(render_conversation)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def _texts_of_files(paths: list[str], text_field: Optional[str],
                    on_progress: Optional[Callable[[int], None]]) -> Iterator[str]:
    from tfkit.data.sources import expand_inputs, iter_documents

    files = expand_inputs(paths)
    for doc in iter_documents(files, text_field=text_field, on_progress=on_progress):
        yield doc.text
