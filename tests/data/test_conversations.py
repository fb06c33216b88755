"""Conversation data: the loss mask covers exactly the assistant turns (tfkit's format and a Jinja
template), the loss with masks is the hand-computed one, masked tokens get no gradient, windows
without an assistant token add nothing, and files without a mask still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tfkit.data.chat import render_template, render_tfkit
from tfkit.data.loader import BatchLoader, eval_batches
from tfkit.data.prepare import EncodeStats, prepare
from tfkit.data.tokenfile import TokenFile, TokenFileHeader, write_token_file
from tfkit.data.tokenizer import Tokenizer
from tfkit.errors import DataError
from tfkit.models.base import cross_entropy

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVO = [{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 2 plus 5?"},
         {"role": "assistant", "content": "5 plus 2 is 7."}, {"role": "user", "content": "And 1 plus 1?"},
         {"role": "assistant", "content": "2"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.conftest import CORPUS

    return Tokenizer.train([(CORPUS / "macbeth.txt").read_text()], vocab_size=400)


def _chats(path, n=40, bad=()):
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                    {"role": "assistant", "content": f"{i} plus {i + 1} is {2 * i + 1}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
        for line in bad:
            f.write(json.dumps(line) + "\n")
    return path


def _marked(tok, tf, start, end):
    """The texts of the runs of marked tokens in tokens[start:end]."""
    ids, mask = tf.tokens[start:end].tolist(), tf.loss_mask(start, end)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_tfkit_format_spans_are_the_assistant_contents_and_their_end_tokens():
    r = render_tfkit(CONVO)
    assert [r.text[a:b] for a, b in r.spans] == ["5 plus 2 is 7.<|end|>", "2<|end|>"]


def test_a_jinja_template_spans_skip_the_users_equal_text_and_include_im_end():
    r = render_template(QWEN_TEMPLATE, CONVO[1:], ["<|im_end|>"])
    assert r.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert [r.text[a:b] for a, b in r.spans] == ["5 plus 2 is 7.<|im_end|>", "2<|im_end|>"]
    with pytest.raises(DataError, match="has role 'robot'"):
        render_template(QWEN_TEMPLATE, [{"role": "robot", "content": "x"}], [])


def test_prepare_marks_exactly_the_assistant_turns(tok, tmp_path):
    stats = EncodeStats()
    h = prepare([_chats(tmp_path / "c.jsonl", 3)], tok, tmp_path / "c.bin", stats=stats)
    tf = TokenFile.open(tmp_path / "c.bin")
    tf.verify()
    assert h.format_version == 2 and h.n_loss_tokens == int(tf.loss_mask().sum()) and stats.n_conversations == 3
    assert _marked(tok, tf, 0, len(tf)) == [f"{i} plus {i + 1} is {2 * i + 1}.<|end|>" for i in range(3)]


def test_an_imported_models_template_is_used_and_its_end_of_turn_is_trained(tmp_path):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from tests.conftest import CORPUS

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator([(CORPUS / "macbeth.txt").read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tokenizer.json").write_text(t.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    qtok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert qtok.special.chat_template == QWEN_TEMPLATE and qtok.stop_ids == (0, 2)
    prepare([_chats(tmp_path / "c.jsonl", 2)], qtok, tmp_path / "c.bin")
    tf = TokenFile.open(tmp_path / "c.bin")
    text = qtok.decode(tf.tokens[:].tolist())
    assert text.count("<|im_start|>system\nYou are a helpful assistant.") == 2  # the template's own default
    assert _marked(qtok, tf, 0, len(tf)) == ["0 plus 1 is 1.<|im_end|>", "1 plus 2 is 3.<|im_end|>"]


def test_invalid_conversations_are_skipped_with_file_and_line_or_refused_when_strict(tok, tmp_path):
    src = _chats(tmp_path / "c.jsonl", 2, bad=[{"messages": [{"role": "robot", "content": "hi"}]},
                                               {"messages": [{"role": "user", "content": 3}]}])
    stats = EncodeStats()
    prepare([src], tok, tmp_path / "c.bin", stats=stats)
    assert stats.n_skipped == 2 and stats.n_conversations == 2
    assert stats.skipped[0].startswith(f"`{src}:3`") and "role 'robot'" in stats.skipped[0]
    assert f"`{src}:4`" in stats.skipped[1] and "not a string" in stats.skipped[1]
    with pytest.raises(DataError, match=f"{src.name}:3"):
        prepare([src], tok, tmp_path / "strict.bin", strict=True)
    assert not (tmp_path / "strict.bin").exists()


def test_plain_text_keeps_version_1_files_and_old_headers_still_load(tok, tmp_path):
    (tmp_path / "t.txt").write_text("Fair is foul, and foul is fair.\n")
    h = prepare([tmp_path / "t.txt"], tok, tmp_path / "t.bin")
    tf = TokenFile.open(tmp_path / "t.bin")
    assert h.format_version == 1 and not tf.has_mask and tf.loss_mask() is None
    raw = (tmp_path / "t.bin").read_bytes()[12:4096].rstrip(b"\0")
    assert b"n_loss_tokens" not in raw  # byte-for-byte the header earlier versions wrote
    old = {k: v for k, v in h.to_dict().items()}
    assert TokenFileHeader.from_dict(old) == h


def test_loader_targets_outside_the_mask_are_ignored(tmp_path):
    ids = np.arange(1, 41) % 30
    mask = (np.arange(40) % 4) == 3
    write_token_file(tmp_path / "m.bin", [(ids, mask)], 30, "h", 0, "fp")
    tf = TokenFile.open(tmp_path / "m.bin")
    x, y = BatchLoader(tf.tokens, 2, 8, seed=3, mask=tf.mask_view()).next_batch()
    starts = x[:, 0].numpy() - 1  # ids[i] = i + 1 here
    for row, s in enumerate(starts):
        want = [int(ids[s + 1 + j]) if mask[s + 1 + j] else -1 for j in range(8)]
        assert y[row].tolist() == want
    xe, ye = next(eval_batches(tf.tokens[8:40], 4, 8, mask=tf.mask_view().slice(8, 40)))  # a held-out end
    assert ye[0].tolist() == [int(ids[9 + j]) if mask[9 + j] else -1 for j in range(8)]
    assert xe[0].tolist() == ids[8:16].tolist()


def test_masked_loss_is_the_hand_computed_one_and_masked_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    keep = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    loss = cross_entropy(logits, torch.where(keep, targets, -1))
    logp = logits.log_softmax(-1)
    hand = -sum(logp[b, t, targets[b, t]] for b, t in keep.nonzero().tolist()) / 3
    assert torch.allclose(loss, hand)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep].abs().sum(-1) > 0).all()
    empty = torch.randn(1, 4, 11, requires_grad=True)
    zero = cross_entropy(empty, torch.full((1, 4), -1))
    zero.backward()
    assert zero.item() == 0.0 and (empty.grad == 0).all()  # a window without an assistant token: no NaN
    assert torch.equal(cross_entropy(logits, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def _tfkit(args, home):
    env = {**os.environ, "TFKIT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tfkit", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_step_counts_every_assistant_token_once_however_it_is_split_into_micro_batches(tok, tmp_path):
    """The loss of a step is the mean over all its counted targets: 1 micro-batch of 8 windows and 2 of
    4 (the same windows) give the same step-1 loss, though the halves hold different token counts."""
    tok.save(tmp_path / "tok.json")
    prepare([_chats(tmp_path / "c.jsonl", 300)], tok, tmp_path / "c.bin")
    common = ["train", "--train-data", tmp_path / "c.bin", "--tokenizer", tmp_path / "tok.json", "--max-steps", 1,
              "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
              "--set", "model.context_length=16", "--set", "train.eval_steps=1"]
    losses = {}
    for name, b, a in (("one", 8, 1), ("two", 4, 2)):
        r = _tfkit(common + ["--name", name, "--set", f"train.batch_size={b}", "--set", f"train.grad_accum_steps={a}",
                             "--json"], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        rec = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        step = next(x for x in rec if x.get("kind") == "step")
        losses[name] = (step["loss"], step["stats"]["loss_tokens"])
    assert losses["one"][1] == losses["two"][1] < 8 * 16  # only the assistant targets count
    assert abs(losses["one"][0] - losses["two"][0]) < 1e-5


def test_split_carries_the_loss_mask_with_its_documents(tok, tmp_path):
    from tfkit.data.split import split_token_file

    prepare([_chats(tmp_path / "c.jsonl", 30)], tok, tmp_path / "c.bin")
    r = split_token_file(tmp_path / "c.bin", 0.2, tokenizer=tok)
    whole = TokenFile.open(tmp_path / "c.bin")
    parts = [TokenFile.open(r.train_path), TokenFile.open(r.val_path)]
    assert all(p.has_mask for p in parts)
    assert sum(p.header.n_loss_tokens for p in parts) == whole.header.n_loss_tokens
    answers = sorted(x for p in parts for x in _marked(tok, p, 0, len(p)))
    assert answers == sorted(f"{i} plus {i + 1} is {2 * i + 1}.<|end|>" for i in range(30))


def test_conversations_longer_than_the_context_are_skipped_by_name_or_refused(tok, tmp_path):
    src = _chats(tmp_path / "c.jsonl", 3)
    long = [{"role": "user", "content": "What is " + " plus ".join(map(str, range(40))) + "?"},
            {"role": "assistant", "content": "780."}]
    with open(src, "a") as f:
        f.write(json.dumps({"messages": long}) + "\n")
    stats = EncodeStats()
    prepare([src], tok, tmp_path / "c.bin", stats=stats, context_length=64)
    assert stats.n_conversations == 3 and stats.n_skipped == 1
    assert stats.skipped[0].startswith(f"`{src}:4`: a conversation of ") and "longer than the context (64" in stats.skipped[0]
    with pytest.raises(DataError, match=f"{src.name}:4"):
        prepare([src], tok, tmp_path / "s.bin", context_length=64, strict=True)
    with pytest.raises(DataError, match="every conversation was skipped \\(4\\)"):
        prepare([src], tok, tmp_path / "s.bin", context_length=5)


def test_tokenize_encode_shows_a_conversation_as_rendered_with_the_counted_tokens(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    convo = json.dumps([{"role": "user", "content": "Hail"}, {"role": "assistant", "content": "All hail"}])
    r = subprocess.run([sys.executable, "-m", "tfkit", "tokenize", "--tokenizer", tmp_path / "tok.json", "--encode", convo,
                        "--json"], capture_output=True, text=True, env={**os.environ, "TFKIT_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == "<|user|>\nHail<|end|>\n<|assistant|>\nAll hail<|end|>\n"
    assert "".join(t["text"] for t in out["tokens"] if t["loss"]) == "All hail<|end|>" and out["loss_tokens"] >= 2


def test_a_conversation_without_an_assistant_turn_is_skipped_unless_every_token_trains(tok, tmp_path):
    src = _chats(tmp_path / "c.jsonl", 2, bad=[{"messages": [{"role": "user", "content": "Hello?"}]}])
    stats = EncodeStats()
    prepare([src], tok, tmp_path / "a.bin", stats=stats)
    assert stats.n_skipped == 1 and stats.skipped[0].startswith(f"`{src}:3`: a conversation without an assistant turn")
    with pytest.raises(DataError, match=f"{src.name}:3"):
        prepare([src], tok, tmp_path / "s.bin", strict=True)
    kept = EncodeStats()
    prepare([src], tok, tmp_path / "all.bin", stats=kept, loss_on="all")
    assert kept.n_skipped == 0 and kept.n_conversations == 3 and kept.n_without_assistant == 1
