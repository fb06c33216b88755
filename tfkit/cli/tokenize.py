"""`tfkit tokenize`: train a byte-level BPE tokenizer, or inspect one (encode a string, show the tokens)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt, require_utf8
from tfkit.cli.output import err, human_bytes, human_count, info, print_json, progress_bar

MEASURE_BYTES = 256 << 20
"""Compression is measured on at most this many bytes of input text."""


def _code(text: object) -> str:
    from rich.markup import escape

    return escape(f"`{text}`")


def _shown(text: str) -> str:
    """A token's text with invisible characters made visible (JSON-style escapes)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _measure(tok, files: list[str], text_field: Optional[str]) -> dict:
    """Encode (up to MEASURE_BYTES of) the inputs; bytes per token on them."""
    from tfkit.data.prepare import EncodeStats, encode_documents
    from tfkit.data.sources import expand_inputs, iter_documents

    paths = expand_inputs(files)
    stats = EncodeStats()
    capped = False
    with progress_bar("measuring compression", sum(p.stat().st_size for p in paths)) as advance:
        docs = iter_documents(paths, text_field=text_field, on_progress=advance)
        for _ in encode_documents(docs, tok, stats):
            if stats.n_bytes >= MEASURE_BYTES:
                capped = True
                break
    text_tokens = stats.n_tokens - stats.n_documents  # end-of-text ids are not text
    bpt = stats.n_bytes / text_tokens if text_tokens else 0.0
    return {"bytes": stats.n_bytes, "tokens": text_tokens, "documents": stats.n_documents,
            "bytes_per_token": round(bpt, 4), "measured_on_prefix": capped}


def _inspect(tok, path: Path, encode: Optional[str], json_out: bool) -> None:
    from rich.table import Table

    if encode is None:
        summary = {"tokenizer": str(path), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "hash": tok.hash,
                   "special_tokens": tok.special_ids}
        if json_out:
            print_json(summary)
            return
        info(f"tokenizer {_code(path)}: vocab size {tok.vocab_size}, hash {tok.hash[:12]}")
        for t, i in tok.special_ids.items():
            info(f"  {i:>6}  {_code(t)}")
        info("encode text with " + _code(f'tfkit tokenize --tokenizer {path} --encode "some text"'))
        return
    messages = _messages(encode)
    mask = None
    if messages is not None:  # a conversation: render it as `prepare` does and show what the loss counts
        from tfkit.data.chat import render
        from tfkit.data.prepare import span_mask

        rendered = render(messages, tok)
        encode = rendered.text
        (ids, offsets), = tok.encode_with_offsets([encode])
        mask = span_mask(offsets, rendered.spans)
    else:
        ids = tok.encode(encode)
    lengths = tok.byte_lengths()
    rows = [{"id": int(i), "text": tok.decode([i]), "token": tok.id_to_token(i), "bytes": int(lengths[i])} for i in ids]
    if mask is not None:
        for r, m in zip(rows, mask):
            r["loss"] = bool(m)
    n_bytes = len(encode.encode("utf-8"))
    result = {"text": encode, "n_tokens": len(ids), "n_bytes": n_bytes,
              "bytes_per_token": round(n_bytes / len(ids), 4) if ids else 0.0, "ids": [int(i) for i in ids],
              "tokens": rows}
    if mask is not None:
        result["loss_tokens"] = int(mask.sum())
    if json_out:
        print_json(result)
        return
    table = Table(title=None, show_edge=False, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("id", justify="right")
    table.add_column("text")
    table.add_column("bytes", justify="right")
    if mask is not None:
        table.add_column("loss")
    from rich.markup import escape

    for k, r in enumerate(rows):
        shown = _shown(r["text"])
        if "\ufffd" in r["text"]:  # part of a multi-byte character: show its bytes
            shown = "".join(f"\\x{b:02x}" for b in tok.token_bytes(r["id"]))
        extra = [("counted" if r["loss"] else "")] if mask is not None else []
        table.add_row(str(k), str(r["id"]), escape(f"'{shown}'"), str(r["bytes"]), *extra)
    err.print(table)
    info(f"{len(ids)} tokens for {n_bytes} bytes ({result['bytes_per_token']:.2f} bytes/token)"
         + (f"; the loss counts {result['loss_tokens']} (the assistant turns)" if mask is not None else ""))


def _messages(text: str):
    """The messages of ``text`` when it is a JSON conversation (``[{role, content}, ...]`` or
    ``{"messages": [...]}``), else None (plain text)."""
    import json

    if not text.lstrip().startswith(("[", "{")):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        value = value.get("messages")
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return None


def command(
    files: Annotated[Optional[list[str]], typer.Argument(
        help="Text (.txt) or JSONL (.jsonl) files, folders or quoted globs to train on; .gz is read too.",
        metavar="FILES...", show_default=False)] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size to train, special tokens included "
                                            "(at least 261 = 256 bytes + 5 special tokens).")] = 4096,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the trained tokenizer (HF tokenizer.json).",
                                      metavar="FILE")] = Path("tokenizer.json"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it already exists.")] = False,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="JSONL field holding the text "
                                                      "(default: the first of text, content, message, body, output; "
                                                      "or a messages list).", metavar="FIELD")] = None,
    min_frequency: Annotated[int, typer.Option("--min-frequency", min=1, help="Merge only pairs seen at least this often.")] = 2,
    tokenizer: Annotated[Optional[Path], typer.Option("--tokenizer", "-t", help="Inspect this existing tokenizer "
                                                      "instead of training one (with FILES: measure its compression).",
                                                      metavar="FILE")] = None,
    encode: Annotated[Optional[str], typer.Option("--encode", "-e", help="With --tokenizer: encode this text and show "
                                                  "each token id and its text.", metavar="TEXT")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a byte-level BPE tokenizer on text or JSONL files, or inspect one.

    Training prints the vocab size and the compression (bytes per token) on the input. The tokenizer has an end-of-text token (id 0) and chat-role tokens for conversation data.

    Examples:

      tfkit tokenize macbeth.txt hamlet.txt --vocab-size 4096 --out tokenizer.json

      tfkit tokenize data/ --vocab-size 16384 --out tokenizer.json --force

      tfkit tokenize --tokenizer tokenizer.json --encode "Fair is foul, and foul is fair"

      tfkit tokenize --tokenizer tokenizer.json --encode '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'
    """
    from tfkit.data.tokenizer import Tokenizer
    from tfkit.errors import DataError

    if encode is not None:
        require_utf8(encode, "--encode")
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        if not files:
            _inspect(tok, tokenizer, encode, json_out)
            return
        if encode is not None:
            raise DataError("give either FILES or --encode with --tokenizer, not both",
                            "`tfkit tokenize --tokenizer tokenizer.json --encode TEXT`")
        m = _measure(tok, files, text_field)
        if json_out:
            print_json({"tokenizer": str(tokenizer), "vocab_size": tok.vocab_size, **m})
        else:
            info(f"tokenizer {_code(tokenizer)} (vocab size {tok.vocab_size}): {m['bytes_per_token']:.2f} bytes/token "
                 f"on {human_bytes(m['bytes'])} of text ({human_count(m['tokens'])} tokens)")
        return
    if encode is not None:
        raise DataError("--encode needs an existing tokenizer", "`tfkit tokenize --tokenizer tokenizer.json --encode TEXT`")
    if not files:
        raise DataError("no input files to train the tokenizer on",
                        "`tfkit tokenize FILES… --vocab-size 4096 --out tokenizer.json`")
    if out.exists() and not force:
        raise DataError(f"`{out}` already exists", "pass `--force` to overwrite it, or choose another `--out`")
    if out.is_dir():
        raise DataError(f"`{out}` is a folder", "give `--out` a file name such as tokenizer.json")

    from tfkit.data.sources import expand_inputs

    paths = expand_inputs(files)
    if out.resolve() in {p.resolve() for p in paths}:
        raise DataError(f"`{out}` is one of the inputs", "choose another `--out`, e.g. tokenizer.json")
    start = time.perf_counter()
    with progress_bar("training tokenizer", sum(p.stat().st_size for p in paths)) as advance:
        tok = Tokenizer.train(paths, vocab_size, min_frequency=min_frequency, text_field=text_field, on_progress=advance)
    train_s = time.perf_counter() - start
    tok.save(out)
    m = _measure(tok, [str(p) for p in paths], text_field)
    if tok.vocab_size < vocab_size:
        from tfkit.cli.output import warn

        warn(f"the input is small: the tokenizer has {tok.vocab_size} tokens, fewer than --vocab-size {vocab_size}")
    if json_out:
        print_json({"tokenizer": str(out), "vocab_size": tok.vocab_size, "hash": tok.hash, "eot_id": tok.eot_id,
                    "files": len(paths), "seconds": round(train_s, 3), **m})
        return
    prefix = " (first part)" if m["measured_on_prefix"] else ""
    info(f"wrote {_code(out)}: vocab size {tok.vocab_size}, trained on {len(paths)} file(s) in {train_s:.1f} s")
    info(f"compression: {m['bytes_per_token']:.2f} bytes/token on {human_bytes(m['bytes'])} of input{prefix} "
         f"({human_count(m['tokens'])} tokens, {m['documents']} documents)")
    info("next: " + _code(f"tfkit prepare {' '.join(files)} --tokenizer {out} --out corpus.bin"))
