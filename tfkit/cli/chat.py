"""`tfkit chat`: talk with a run in the terminal, or answer one message for a script."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

from tfkit.cli.options import RunArg, require_utf8
from tfkit.cli.output import err, info, print_json


def command(
    run: RunArg,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Answer this one message and exit "
                                                   "(without it and with stdin not a terminal, stdin is the message).")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system prompt opening the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="Sampling temperature; 0 = greedy.")] = 0.7,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for reproducible answers.")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="latest, best or a step number.")] = "latest",
    json_out: Annotated[bool, typer.Option("--json", help="With --message or stdin: print one JSON document "
                                                          "(messages, reply, tokens, why it stopped).")] = False,
) -> None:
    """Chat with a run, using its chat template and stopping at the end of each turn.

    Interactive on a terminal: type a message; `/reset` clears the history, `/system TEXT` sets the
    system prompt, `/exit` (or Ctrl-D) ends. A run trained by tfkit uses tfkit's role tokens; an
    imported model uses its own Jinja chat template.

    Examples:

      tfkit chat my-run

      tfkit chat my-run --message "What is 2 plus 3?" --temperature 0 --json

      echo "Hello" | tfkit chat my-run
    """
    from tfkit.errors import DataError
    from tfkit.train.setup import load_run, run_runtime

    for name, value in (("--message", message), ("--system", system)):
        if value is not None:
            require_utf8(value, name)
    runtime = run_runtime(run)
    loaded = load_run(run, runtime.device, checkpoint, attention=runtime.attention,
                      on_warning=lambda s: info(f"warning: {s}"))
    if loaded.tokenizer is None:
        raise DataError(f"run `{loaded.run_dir.name}` has no tokenizer.json, so it cannot read or write text",
                        "train with `--tokenizer tokenizer.json` to chat")
    session = Chat(loaded, runtime, system, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                                  top_p=top_p, seed=seed))
    if message is None and not sys.stdin.isatty():
        message = sys.stdin.read().strip()
        if not message:
            raise DataError("stdin is empty: no message to answer", 'pass `--message "…"`, or run on a terminal to chat')
    if message is not None:
        reply, n, why = session.answer(message, stream=not json_out)
        if json_out:
            print_json({"run": loaded.run_dir.name, "checkpoint": loaded.checkpoint.name, "messages": session.messages,
                        "reply": reply, "tokens": n, "stopped": why})
        return
    session.interact()


class Chat:
    """One conversation with a loaded run: the messages so far and how to continue them."""

    def __init__(self, loaded: Any, runtime: Any, system: Optional[str], sampling: dict) -> None:
        self.loaded, self.runtime, self.sampling = loaded, runtime, sampling
        self.tok = loaded.tokenizer
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()
        self.stops = self.tok.stop_ids + tuple(i for i in [self.tok.token_to_id("<|end|>")] if i is not None)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """The conversation rendered with the generation prompt, cut to fit the context by dropping
        the oldest turns (the system prompt stays)."""
        from tfkit.data.chat import render

        ctx = self.loaded.cfg.model.context_length
        while True:
            text = render(self.messages, self.tok, add_generation_prompt=True).text
            ids = self.tok.encode(text)
            if getattr(self.tok.special, "chat_template", None) is None:
                ids = [self.tok.bos_id] + ids  # tfkit's conversations follow an end-of-text in training
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(ids) + 1 <= ctx or len(self.messages) - first <= 1:
                return ids[-(ctx - 1):]
            del self.messages[first:first + 2]  # the oldest exchange
            info("(the conversation is longer than the context: the oldest turn was dropped)")

    def answer(self, text: str, stream: bool = True) -> tuple[str, int, str]:
        """Add the user's ``text``, generate the reply (streamed to stdout when ``stream``) and add it.

        Returns:
            (reply, tokens generated, "end_of_turn" or "max_new_tokens").
        """
        from tfkit.cli.generate import _under
        from tfkit.train.sample import generate

        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        s = self.sampling
        tokens = generate(self.loaded.model, ids, s["max_new_tokens"], temperature=s["temperature"], top_k=s["top_k"],
                          top_p=s["top_p"], seed=s["seed"], stop_ids=self.stops, device=self.runtime.device)
        out: list[int] = []
        shown, why = "", "max_new_tokens"
        for token in _under(self.runtime.autocast, tokens):
            if token in self.stops:
                why = "end_of_turn"
                break
            out.append(token)
            reply = self.tok.decode(out)
            if stream and not reply.endswith("\ufffd"):
                sys.stdout.write(reply[len(shown):])
                sys.stdout.flush()
                shown = reply
        reply = self.tok.decode(out)
        if stream:
            sys.stdout.write(reply[len(shown):] + "\n")
            sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": reply})
        return reply, len(out), why

    def interact(self) -> None:
        """Read messages from the terminal until /exit or end of input."""
        info(f"chatting with `{self.loaded.run_dir.name}` ({self.loaded.checkpoint.name}); "
             "/reset clears, /system TEXT sets the system prompt, /exit ends")
        while True:
            try:
                line = err.input("[bold]you>[/bold] ")
            except EOFError:
                err.print()
                return
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                self.reset()
                info("(history cleared)")
                continue
            if line.startswith("/system"):
                self.system = line[len("/system"):].strip() or None
                self.reset()
                info("(system prompt set; history cleared)" if self.system else "(system prompt removed)")
                continue
            if line.startswith("/"):
                info(f"unknown command {json.dumps(line.split()[0])}: /reset, /system TEXT, /exit")
                continue
            err.print("[bold]model>[/bold] ", end="")
            self.answer(line)
