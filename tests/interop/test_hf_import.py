"""`tfkit import`: every supported family gives transformers' logits, eval loss and greedy tokens;
what cannot be represented exactly is refused with exit 2; repo ids come from the local cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install 'tfkit[hf]'`")

from hftiny import CORPUS, json_out, save_hf_model, tfkit

from tfkit.data.tokenizer import SpecialTokens, Tokenizer
from tfkit.errors import ConfigError, DataError
from tfkit.interop import hf
from tfkit.interop.hf_runs import import_run
from tfkit.train.setup import load_run

FAMILIES = ["llama", "llama3", "qwen2", "qwen3", "mistral"]


def _hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_gives_the_logits_of_transformers(hf_models, family):
    done = import_run(str(hf_models[family]), name=f"imp-{family}")
    loaded = load_run(f"imp-{family}")
    ids = torch.randint(0, 440, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _hf_model(hf_models[family])(ids).logits
        got = loaded.model(ids).logits
    assert (want - got).abs().max().item() < 1e-4
    m = done.model.model
    assert (m.qk_norm, m.attention_bias) == (family == "qwen3", family == "qwen2")
    assert m.head_dim == (32 if family == "qwen3" else None)  # Qwen3's heads are wider than d_model / n_heads
    assert (m.rope_scaling is not None, m.tie_embeddings) == (family == "llama3", family in ("llama3", "qwen2"))
    assert loaded.step == 0 and json.loads((done.run_dir / "run.json").read_text())["status"] == "imported"


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_and_greedy_generate_agree_with_transformers(hf_models, family, tmp_path, tfkit_home):
    from tfkit.data.loader import eval_batches
    from tfkit.data.tokenfile import TokenFile

    r = json_out(tfkit(["import", hf_models[family], "--name", "m", "--context-length", 64, "--json"], tfkit_home))
    assert r["family"] == family.removesuffix("3") or r["family"] == family == "qwen3"
    assert r["context_length"] == 64
    run = tfkit_home / "runs" / "m"
    text = tmp_path / "scene.txt"
    text.write_text((CORPUS / "macbeth.txt").read_text()[:4000])
    data = tmp_path / "scene.bin"
    assert tfkit(["prepare", text, "--tokenizer", run / "tokenizer.json", "--out", data], tfkit_home).returncode == 0
    got = json_out(tfkit(["eval", "m", "--data", data, "--batch-size", 4, "--json"], tfkit_home))

    model = _hf_model(hf_models[family])
    ce, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(TokenFile.open(data).tokens, 4, 64):
            logits = model(x).logits
            ce += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    assert abs(got["loss"] - ce / n) < 1e-4

    prompt = "MACBETH:"
    out = json_out(tfkit(["generate", "m", "--prompt", prompt, "--max-new-tokens", 30, "--temperature", 0,
                          "--no-stop-at-eot", "--json"], tfkit_home))
    tok = Tokenizer.load(run / "tokenizer.json")
    ids = torch.tensor([[tok.bos_id, *tok.encode(prompt)]])
    assert out["input_ids"] == ids[0].tolist()
    from transformers import GenerationConfig

    greedy = GenerationConfig(do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=tok.eot_id)
    new = model.generate(ids, generation_config=greedy)[0, ids.shape[1]:].tolist()
    assert len(new) == 30 and len(set(new)) > 3  # a real sequence, not one token repeated
    assert out["token_ids"] == new


def test_special_tokens_come_from_the_model_files_not_from_tfkit(hf_models, tmp_path):
    folder = shutil.copytree(hf_models["llama"], tmp_path / "llama")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 0]}))
    import_run(str(folder), name="sp")
    tok = Tokenizer.load(folder / "tokenizer.json")
    assert tok.token_to_id("<|endoftext|>") is None  # a Llama-style vocabulary: tfkit's default EOT is absent
    assert (tok.eot_id, tok.bos_id, tok.stop_ids) == (1, 0, (1, 0))  # </s> ends, <s> begins, both stop


def test_sentencepiece_byte_fallback_counts_bytes_exactly():
    """Llama 2 / Mistral tokenizers: ``▁`` is a space and ``<0xNN>`` one byte; bits per byte must
    divide by the text's real UTF-8 size."""
    from tokenizers import Tokenizer as HFTok, decoders, models, normalizers, trainers

    t = HFTok(models.BPE(byte_fallback=True, unk_token=None))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    text = (CORPUS / "macbeth.txt").read_text()[:20000]
    alphabet = sorted(set(text.replace(" ", "\u2581")))
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]
                                                      + [f"<0x{i:02X}>" for i in range(256)],
                                                      initial_alphabet=alphabet, show_progress=False))
    tok = Tokenizer(t, special=SpecialTokens(eos="</s>"))
    sample = "Fair is foul, and foul is fair: — naïve ☃"  # the last characters go through byte fallback
    ids = tok.encode(sample)
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)
    assert int(tok.byte_lengths()[ids].sum()) == len(sample.encode("utf-8"))


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(num_local_experts=8, num_experts_per_tok=2), "num_local_experts"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "yarn"),
    (lambda c: c.update(sliding_window=64), "sliding_window"),
    (lambda c: c.update(model_type="gemma"), "model_type `gemma`"),
])
def test_a_model_tfkit_cannot_hold_exactly_is_refused_naming_the_field(hf_models, tmp_path, tfkit_home, edit, field):
    folder = shutil.copytree(hf_models["mistral"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    r = tfkit(["import", folder, "--name", "bad"], tfkit_home)
    assert r.returncode == 2 and field in r.stderr.splitlines()[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[1].startswith("hint:")
    assert not (tfkit_home / "runs" / "bad").exists()


def test_a_folder_without_weights_is_refused(hf_models, tmp_path, tfkit_home):
    folder = shutil.copytree(hf_models["qwen2"], tmp_path / "q")
    (folder / "model.safetensors").unlink()
    r = tfkit(["import", folder, "--name", "bad"], tfkit_home)
    assert r.returncode == 2 and "holds no weights" in r.stderr and "Traceback" not in r.stderr
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(DataError, match="only PyTorch pickle weights"):
        hf.find_weight_files(folder)


def test_a_repo_id_is_read_from_the_local_hugging_face_cache_offline(hf_models, tmp_path, tfkit_home):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-qwen" / "snapshots" / ("a" * 40)
    shutil.copytree(hf_models["qwen2"], snap)
    (cache / "models--acme--tiny-qwen" / "refs").mkdir()
    (cache / "models--acme--tiny-qwen" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_CACHE": str(cache)}
    r = json_out(tfkit(["import", "acme/tiny-qwen", "--json"], tfkit_home, env=env))
    assert r["run"] == "tiny-qwen" and r["family"] == "qwen2"
    r = tfkit(["import", "acme/absent"], tfkit_home, env=env)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr and "--download" in r.stderr
    r = tfkit(["import", "acme/absent", "--download"], tfkit_home, env=env)  # HF_HUB_OFFLINE=1: as with no network
    assert r.returncode == 2 and "cannot download `acme/absent`" in r.stderr and "offline" in r.stderr
    assert "Traceback" not in r.stderr and not (tfkit_home / "runs" / "absent").exists()


def test_import_keeps_bf16_weights_bf16_and_refuses_an_existing_run(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = save_hf_model("qwen2", tmp_path / "src")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, tmp_path / "bf16" / f)
    done = import_run(str(tmp_path / "bf16"), name="b")
    with safe_open(str(done.run_dir / "checkpoints/step-00000000/model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    assert load_run("b").model.embed.weight.dtype == torch.float32  # trained and evaluated in the run's precision
    with pytest.raises(Exception, match="already exists"):
        import_run(str(tmp_path / "bf16"), name="b")


def test_head_dim_config_field_validates():
    from tfkit.config import ModelConfig

    assert ModelConfig(d_model=64, n_heads=4, head_dim=32).head_size == 32
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        ModelConfig(d_model=64, n_heads=4, head_dim=7)
    with pytest.raises(ConfigError):
        hf.parse_dtype("int8")


def test_an_imported_run_says_what_to_do_where_it_has_no_data_or_training_state(hf_models, tfkit_home):
    assert tfkit(["import", hf_models["qwen2"], "--name", "q"], tfkit_home).returncode == 0
    r = tfkit(["eval", "q"], tfkit_home)
    assert r.returncode == 2 and "has no data of its own" in r.stderr and "--text" in r.stderr
    r = tfkit(["resume", "q", "--max-steps", 5], tfkit_home)
    assert r.returncode == 3 and "has not been trained" in r.stderr and "tfkit train --init-from q" in r.stderr
    listed = json_out(tfkit(["list-models", "--json"], tfkit_home))
    assert [(m["name"], m["status"], m["step"]) for m in listed] == [("q", "imported", 0)]


def test_chat_with_an_imported_model_uses_its_own_template(hf_models, tmp_path, tfkit_home):
    """The model's Jinja chat_template renders the prompt (no begin token of tfkit's added) and its
    end-of-turn token is a stop token."""
    folder = shutil.copytree(hf_models["qwen2"], tmp_path / "q")
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))  # <|im_end|>, <|endoftext|>
    import_run(str(folder), name="qc")

    from tfkit.cli.chat import Chat
    from tfkit.train.setup import run_runtime

    runtime = run_runtime("qc")
    chat = Chat(load_run("qc"), runtime, "Be brief.", dict(max_new_tokens=8, temperature=0.0, top_k=None, top_p=None,
                                                            seed=0))
    chat.messages.append({"role": "user", "content": "Hail"})
    tok = chat.tok
    want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHail<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt_ids() == tok.encode(want) and tok.token_to_id("<|im_end|>") in chat.stops
    r = json_out(tfkit(["chat", "qc", "--message", "Hail", "--temperature", 0, "-n", 8, "--json"], tfkit_home))
    assert r["stopped"] in ("end_of_turn", "max_new_tokens") and r["tokens"] <= 8
