"""`tfkit prepare`: text or JSONL files → one token file (header + flat ids) for memmap reading."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from tfkit.cli.options import JsonOpt
from tfkit.cli.output import human_bytes, human_count, info, print_json, progress_bar


def _code(text: object) -> str:
    from rich.markup import escape

    return escape(f"`{text}`")


def command(
    files: Annotated[list[str], typer.Argument(
        help="Text (.txt) or JSONL (.jsonl) files, folders or quoted globs to encode; .gz is read too.",
        metavar="FILES...", show_default=False)],
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.json to encode with "
                                            "(train one with `tfkit tokenize`).", metavar="FILE")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Token file to write (replaced atomically if it exists).",
                                      metavar="FILE")] = Path("corpus.bin"),
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="JSONL field holding the text "
                                                      "(default: the first of text, content, message, body, output; "
                                                      "or a messages list, rendered with chat-role tokens).",
                                                      metavar="FIELD")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse an invalid conversation (unknown role, content "
                                                          "that is not text) instead of skipping and counting it.")] = False,
    context_length: Annotated[Optional[int], typer.Option("--context-length", min=2, help="Skip (count and name) "
                                                          "conversations longer than this many tokens, the model's "
                                                          "context; --strict refuses them.")] = None,
    loss_on: Annotated[str, typer.Option("--loss-on", help="assistant: skip conversations without an assistant "
                                         "turn (they train nothing under data.loss_on=assistant); all: keep them.",
                                         metavar="assistant|all")] = "assistant",
    show: Annotated[int, typer.Option("--show", min=0, help="Print the first N documents as encoded, the tokens "
                                                            "the loss counts in [brackets] (conversations).",
                                      metavar="N")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Encode text or JSONL files into one token file for training.

    Each document (a .txt file, or a JSONL line) is followed by the end-of-text token. Encoding is batched and streamed, so memory stays constant on multi-GB inputs. Then split the file with `tfkit split`.

    Examples:

      tfkit prepare macbeth.txt --tokenizer tokenizer.json --out corpus.bin

      tfkit prepare "chats/*.jsonl.gz" --tokenizer tokenizer.json --out chats.bin --text-field messages
    """
    from tfkit.data.prepare import EncodeStats, prepare
    from tfkit.data.sources import expand_inputs
    from tfkit.data.tokenizer import Tokenizer
    from tfkit.errors import DataError

    if loss_on not in ("assistant", "all"):
        raise DataError(f"--loss-on {loss_on!r} is not assistant or all", "write `--loss-on assistant` or `--loss-on all`")
    tok = Tokenizer.load(tokenizer)
    paths = expand_inputs(files)
    if out.is_dir():
        raise DataError(f"`{out}` is a folder", "give `--out` a file name such as corpus.bin")
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    stats = EncodeStats()
    with progress_bar(f"encoding {len(paths)} file(s)", total) as advance:
        h = prepare(paths, tok, out, text_field=text_field, on_progress=advance, stats=stats, strict=strict,
                    context_length=context_length, loss_on=loss_on)
    seconds = time.perf_counter() - start
    text_tokens = h.n_tokens - h.n_documents
    bpt = h.n_bytes / text_tokens if text_tokens else 0.0
    if show:
        _show(out, tok, show)
    convo = {"conversations": stats.n_conversations, "loss_tokens": h.n_loss_tokens if h.has_mask else h.n_tokens,
             "without_assistant": stats.n_without_assistant, "skipped": stats.n_skipped}
    if json_out:
        print_json({"path": str(out), **h.to_dict(), "bytes_per_token": round(bpt, 4), "files": len(paths),
                    "input_bytes": total, "seconds": round(seconds, 3), **convo, "skipped_reasons": stats.skipped})
        return
    rate = total / seconds / 1e6 if seconds > 0 else 0.0
    info(f"wrote {_code(out)}: {h.n_tokens:,} tokens ({human_count(h.n_tokens)}), {h.n_documents:,} documents, "
         f"{h.dtype}, {bpt:.2f} bytes/token")
    info(f"read {human_bytes(total)} from {len(paths)} file(s) in {seconds:.1f} s ({rate:.1f} MB/s)")
    if stats.n_conversations:
        info(f"{stats.n_conversations:,} conversations: the loss counts {h.n_loss_tokens:,} tokens "
             f"({h.n_loss_tokens / h.n_tokens:.1%}, the assistant turns) with data.loss_on=assistant"
             + (f"; {stats.n_without_assistant:,} have no assistant turn (kept: --loss-on all)"
                if stats.n_without_assistant else ""))
    if stats.n_skipped:
        from tfkit.cli.output import warn

        warn(f"skipped {stats.n_skipped:,} conversation(s) (`--strict` refuses them instead): "
             + "; ".join(stats.skipped[:3]))
    info("next: " + _code(f"tfkit split {out} --val-fraction 0.1"))


def _show(path: Path, tok, n: int) -> None:
    """The first ``n`` documents of a token file on stdout, the tokens its loss mask counts in brackets."""
    from tfkit.data.tokenfile import TokenFile

    tf = TokenFile.open(path)
    end = 0
    for _ in range(n):
        stop = end
        while stop < len(tf) and int(tf.tokens[stop]) != tf.header.eot_id:
            stop += 1
        stop = min(stop + 1, len(tf))
        if stop <= end:
            break
        ids, mask = tf.tokens[end:stop].tolist(), tf.loss_mask(end, stop)
        out, run = [], []
        for i, k in zip(ids, mask if mask is not None else [True] * len(ids)):
            if k:
                run.append(i)
                continue
            if run:
                out.append("[" + tok.decode(run) + "]")
                run = []
            out.append(tok.decode([i]))
        if run:
            out.append("[" + tok.decode(run) + "]")
        print("".join(out))
        end = stop
