"""Conversations as text with the character spans the loss should count: the assistant turns.

Two formats render ``[{"role": ..., "content": ...}, ...]``:

* tfkit's own (the default for tokenizers trained by ``tfkit tokenize``): ``<|role|>\\n`` + content +
  ``<|end|>\\n`` per message (:func:`tfkit.data.tokenizer.render_conversation`);
* a Hugging Face model's Jinja ``chat_template`` from its ``tokenizer_config.json`` (an imported run),
  rendered in Jinja's sandbox as ``transformers`` does, so fine-tuning data looks exactly like the
  prompts the model was trained on.

The trained span of an assistant message is its content plus the end-of-turn token that closes it
(``<|end|>``; for a template, the model's end-of-turn/end-of-text token right after the content), as
in torchtune's ``train_on_assistant`` and TRL's ``assistant_only_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tfkit.data.tokenizer import END_OF_MESSAGE, ROLE_TOKENS, render_conversation
from tfkit.errors import DataError

Span = tuple[int, int]
"""Character offsets ``[start, end)`` into the rendered text."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation: ``text`` and the sorted, disjoint ``spans`` of its assistant turns."""

    text: str
    spans: tuple[Span, ...]


def _check(messages: Any) -> None:
    render_conversation(messages)  # the same validation (roles, string content) for both formats


def render_tfkit(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> Rendered:
    """tfkit's format, with each assistant message's content and ``<|end|>`` as a span.

    Raises:
        DataError: not a list of {role, content}, an unknown role, or non-string content.
    """
    _check(messages)
    parts: list[str] = []
    spans: list[Span] = []
    pos = 0
    for msg in messages:
        head = f"{ROLE_TOKENS[msg['role']]}\n"
        body = f"{msg['content']}{END_OF_MESSAGE}"
        if msg["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts += [head, body, "\n"]
        pos += len(head) + len(body) + 1
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return Rendered("".join(parts), tuple(spans))


def render_template(template: str, messages: Sequence[dict[str, Any]], end_tokens: Sequence[str],
                    add_generation_prompt: bool = False, **special: Optional[str]) -> Rendered:
    """A Jinja ``chat_template`` rendered in a sandbox, with each assistant content (found in
    order in the text) plus an end-of-turn token right after it (any of ``end_tokens``, e.g.
    ``<|im_end|>``) as a span.

    Args:
        template: the template source (``tokenizer_config.json``'s ``chat_template``).
        end_tokens: token strings that close a turn.
        special: variables the template may read (``bos_token``, ``eos_token``).

    Raises:
        DataError: invalid messages, a template that does not render, or one whose text does not
            contain an assistant message's content.
    """
    _check(messages)
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("this run's chat template needs jinja2", "install it: `pip install 'tfkit[hf]'`") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    from jinja2.ext import loopcontrols

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **{k: v for k, v in special.items() if v is not None})
    except TemplateError as exc:
        raise DataError(f"the chat template refused the conversation: {exc}", "check the messages' roles and order") from None
    spans: list[Span] = []
    pos = 0
    for msg in messages:  # every message in order, so a user's "5" is never taken for the answer "5"
        start = text.find(msg["content"], pos)
        if start < 0:
            if msg["role"] != "assistant":
                continue  # a template may rewrite or drop system/user text
            raise DataError("the chat template's text does not contain an assistant message as written",
                            "the template rewrites assistant turns; use data.loss_on=all for this data")
        end = start + len(msg["content"])
        if msg["role"] == "assistant":
            for tok in end_tokens:
                if tok and text.startswith(tok, end):
                    end += len(tok)
                    break
            spans.append((start, end))
        pos = end
    return Rendered(text, tuple(spans))


def render(messages: Sequence[dict[str, Any]], tokenizer: Any = None, add_generation_prompt: bool = False) -> Rendered:
    """Render with ``tokenizer``'s own chat template when it has one (an imported model), else in
    tfkit's format. The template's end-of-turn tokens are the tokenizer's stop tokens.

    Raises:
        DataError: see :func:`render_tfkit` and :func:`render_template`.
    """
    special = getattr(tokenizer, "special", None)
    template = getattr(special, "chat_template", None)
    if not template:
        return render_tfkit(messages, add_generation_prompt)
    ends = [t for t in (tokenizer.id_to_token(i) for i in tokenizer.stop_ids) if t]
    return render_template(template, messages, ends, add_generation_prompt,
                           bos_token=special.bos, eos_token=special.eos)
