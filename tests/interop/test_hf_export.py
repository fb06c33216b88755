"""`tfkit export`: a llama run becomes a folder transformers loads with no custom code, with the same
logits and greedy tokens; importing the export gives back identical tensors; variants are refused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the Hugging Face tests need `pip install 'tfkit[hf]'`")

from hftiny import CORPUS, json_out, tfkit
from safetensors.torch import load_file

from tfkit.config import ModelConfig, RopeScaling
from tfkit.interop import hf
from tfkit.models import build_model

_SETS = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.context_length=64",
         "train.batch_size=8", "train.eval_interval=0", "train.eval_steps=2", "optim.warmup_steps=5"]

SHAPES = {
    "llama": dict(),
    "llama-geglu-scaled": dict(ffn="geglu", tie_embeddings=False, head_dim=32, rope_theta=500000.0,
                               rope_scaling=RopeScaling(factor=8.0, original_context_length=16)),
    "qwen2": dict(attention_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=24),
    "qwen3-bias": dict(qk_norm=True, attention_bias=True),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_exportable_shape_loads_in_transformers_with_the_same_logits(tmp_path, shape):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, context_length=64,
                      **SHAPES[shape])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    weights = hf.hf_weights(model.state_dict_for_save(), cfg)
    files = hf.save_sharded(weights, tmp_path, max_shard_bytes=60_000 if shape == "llama" else hf.MAX_SHARD_BYTES)
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config(cfg, "float32", 0, [0])))
    assert len(files) > 1 if shape == "llama" else len(files) == 1  # shards with an index above the size
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert theirs.config.model_type == hf.export_family(cfg) == shape.split("-")[0]
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids).logits).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama run trained 40 steps on Macbeth with a tfkit tokenizer."""
    home = tmp_path_factory.mktemp("home")
    d = tmp_path_factory.mktemp("data")
    play = CORPUS / "macbeth.txt"
    assert tfkit(["tokenize", play, "--vocab-size", 320, "--out", d / "tok.json"], home).returncode == 0
    assert tfkit(["prepare", play, "--tokenizer", d / "tok.json", "--out", d / "play.bin"], home).returncode == 0
    args = ["train", "--train-data", d / "play.bin", "--tokenizer", d / "tok.json", "--name", "tiny", "--max-steps", 40]
    r = tfkit(args + [x for s in _SETS for x in ("--set", s)], home)
    assert r.returncode == 0, r.stderr[-2000:]
    return home, d


def test_a_trained_run_round_trips_through_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from tfkit.data.tokenizer import Tokenizer

    home, _ = trained
    out = tmp_path / "export"
    r = json_out(tfkit(["export", "tiny", "--out", out, "--json"], home))
    assert (r["family"], r["step"], r["dtype"], r["files"]) == ("llama", 40, "float32", ["model.safetensors"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(out / "tokenizer.json")
    assert tok.eos_token == "<|endoftext|>" and tok("MACBETH: Hail").input_ids == ours.encode("MACBETH: Hail")
    chat = tok.apply_chat_template([{"role": "user", "content": "Hail"}], tokenize=False, add_generation_prompt=True)
    assert chat == ours.render_conversation([{"role": "user", "content": "Hail"}], add_generation_prompt=True)

    g = json_out(tfkit(["generate", "tiny", "--prompt", "MACBETH:", "--max-new-tokens", 30, "--temperature", 0,
                        "--no-stop-at-eot", "--json"], home))
    ids = torch.tensor([g["input_ids"]])
    greedy = GenerationConfig(do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0)
    assert model.generate(ids, generation_config=greedy)[0, ids.shape[1]:].tolist() == g["token_ids"]

    from tfkit.train.setup import load_run

    mine = load_run(str(home / "runs" / "tiny"), which="latest")
    with torch.no_grad():
        x = torch.tensor([ours.encode((CORPUS / "macbeth.txt").read_text()[:400])[:64]])
        assert (model(x).logits - mine.model(x).logits).abs().max().item() < 1e-4

    # import the export again, also from shards of at most 100 KB: the very same tensors as the run's
    sharded = json_out(tfkit(["export", "tiny", "--out", tmp_path / "sharded", "--max-shard-gb", 0.0001, "--json"], home))
    assert len(sharded["files"]) > 2 and (tmp_path / "sharded/model.safetensors.index.json").is_file()
    a = load_file(str(home / "runs/tiny/checkpoints/step-00000040/model.safetensors"))
    for source, name in ((out, "back"), (tmp_path / "sharded", "back-sharded")):
        assert tfkit(["import", source, "--name", name], home).returncode == 0
        b = load_file(str(home / "runs" / name / "checkpoints/step-00000000/model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_options_and_refusals(trained, tmp_path):
    home, d = trained
    r = json_out(tfkit(["export", "tiny", "--out", tmp_path / "bf", "--dtype", "bf16", "--checkpoint", 40, "--json"], home))
    assert r["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(tmp_path / "bf/model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf/config.json").read_text())["torch_dtype"] == "bfloat16"

    again = tfkit(["export", "tiny", "--out", tmp_path / "bf"], home)
    assert again.returncode == 2 and "exists already" in again.stderr and "--force" in again.stderr
    assert tfkit(["export", "tiny", "--out", tmp_path / "bf", "--force"], home).returncode == 0

    bad = tfkit(["export", "tiny", "--out", tmp_path / "x", "--dtype", "int8"], home)
    assert bad.returncode == 2 and "--dtype 'int8'" in bad.stderr and not (tmp_path / "x").exists()

    args = ["train", "--train-data", d / "play.bin", "--tokenizer", d / "tok.json", "--name", "routed", "--max-steps", 1,
            "--set", "model.arch=mod"]
    assert tfkit(args + [x for s in _SETS for x in ("--set", s)], home).returncode == 0
    r = tfkit(["export", "routed", "--out", tmp_path / "mod"], home)
    assert r.returncode == 2 and "model.arch=mod run cannot be exported" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mod").exists()


@pytest.mark.slow
def test_a_pretrained_qwen2_shaped_model_continues_as_dtf_and_mod_close_to_where_it_was(trained, tmp_path):
    """The transfer mode of the DTF guide, offline: pretrain a Qwen2-shaped model (q/k/v biases)
    here, export it as a Hugging Face folder, and continue it 20 steps as dtf (--init-from the
    folder) and as mod (--init-from the run it was imported as). Step 1 starts near the pretrained
    loss, far below a fresh model's."""
    home, d = trained
    data = ["--train-data", d / "play.bin"]
    sets = _SETS + ["model.attention_bias=true", "model.n_layers=4", "optim.lr=3e-3", "train.log_interval=1"]
    r = tfkit(["train", *data, "--tokenizer", d / "tok.json", "--name", "pre", "--max-steps", 150]
              + [x for s in sets for x in ("--set", s)], home)
    assert r.returncode == 0, r.stderr[-2000:]
    pretrained = json_out(tfkit(["eval", "pre", "--json"], home))["loss"]
    assert json_out(tfkit(["export", "pre", "--out", tmp_path / "qwen", "--json"], home))["family"] == "qwen2"

    def step_losses(name):
        lines = (home / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if r.get("kind") == "step"}

    short = ["--max-steps", 20, "--set", "train.log_interval=1", "--set", "optim.warmup_steps=5", "--set", "optim.lr=1e-3",
             "--set", "model.context_length=64", "--set", "train.batch_size=8"]
    for arch, source in (("dtf", tmp_path / "qwen"), ("mod", "qwen")):
        r = tfkit(["train", "--init-from", source, "--set", f"model.arch={arch}", *data, "--name", f"to-{arch}", *short], home)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "loaded 50 tensors" in r.stderr and "new (fresh init)" in r.stderr  # 4 blocks x 12, embed, norm
        fresh = tfkit(["train", *data, "--tokenizer", d / "tok.json", "--name", f"fresh-{arch}", "--max-steps", 1,
                       "--set", f"model.arch={arch}"] + [x for s in sets for x in ("--set", s)], home)
        first, start_fresh = step_losses(f"to-{arch}")[1], step_losses(f"fresh-{arch}")[1]
        print(f"{arch}: pretrained {pretrained:.4f}, transfer step 1 {first:.4f}, fresh step 1 {start_fresh:.4f}, "
              f"step 20 {step_losses(f'to-{arch}')[20]:.4f}")
        assert fresh.returncode == 0 and first < pretrained + 0.4 and first < start_fresh - 1.5
