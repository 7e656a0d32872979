"""HF NanoChat directories in the shapes users have, written by transformers itself (save_pretrained):
sharded safetensors with an index, any intermediate_size, rope_theta and rms_norm_eps. And the export's
refusal of what HF NanoChat cannot compute."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import NanoChatConfig, NanoChatForCausalLM

from aquainterp.checkpoints.huggingface import export_hf, import_hf
from aquainterp.model.gpt import ARCH_2026_07, GPT, GPTConfig


def hf_model(**overrides):
    torch.manual_seed(0)
    config = NanoChatConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=64, **overrides)
    model = NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


IDS = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides", [
    {},  # HF's defaults: intermediate_size 8192, rope_theta 10000, eps 1e-6
    {"intermediate_size": 200, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
     "rms_norm_eps": 1e-5},
])
def test_sharded_hf_directory_imports_with_hf_logits(tmp_path, overrides):
    hf = hf_model(**overrides)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ours = import_hf(tmp_path)
    c = hf.config
    assert ours.config.d_mlp == c.intermediate_size
    assert ours.config.rope_base == c.rope_parameters["rope_theta"]
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, atol=1e-4, rtol=0)


def test_missing_or_inconsistent_shards_are_one_line_errors(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    shards[-1].rename(tmp_path / "elsewhere.bin")
    with pytest.raises(FileNotFoundError, match=f"shards \\['{shards[-1].name}'\\] named in") as info:
        import_hf(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "elsewhere.bin").rename(shards[-1])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.fc1.weight"] = shards[0].name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="disagree on tensors"):
        import_hf(tmp_path)


def test_export_of_non_default_shapes_round_trips_through_hf(tmp_path):
    torch.manual_seed(1)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          mlp_hidden=96, rope_base=50000.0, norm_eps=1e-5, pad_vocab_size_to=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    out = export_hf(model, None, tmp_path / "hf")
    hf = NanoChatForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
        # exact on any CPU: the round trip copies the weights; the same kernels on the same shapes
        torch.testing.assert_close(import_hf(out)(ids), model(ids), atol=0, rtol=0)
    assert hf.config.vocab_size == 100  # the padding rows are not exported


def test_export_refuses_2026_features_naming_them(tmp_path):
    model = GPT(GPTConfig(sequence_len=64, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          architecture=ARCH_2026_07))
    with pytest.raises(ValueError) as info:
        export_hf(model, None, tmp_path / "hf")
    message = str(info.value)
    assert "\n" not in message
    for feature in ("sliding windows", "x1.2", "resid_lambdas/x0_lambdas", "value embeddings", "smear", "backout"):
        assert feature in message
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_eval_hf_dir_equals_eval_checkpoint(tmp_path, capsys):
    """`eval --hf-dir` on an export gives the same predictions as `eval --checkpoint` on its source."""

    from test_nanochat_checkpoints import FIXTURES as fixtures  # ../shared, or AQUAINTERP_SHARED_FIXTURES

    from aquainterp.checkpoints.nanochat_tokenizer import load_nanochat_tokenizer
    from aquainterp.checkpoints.native import save_checkpoint
    from aquainterp.cli.main import main
    tokenizer = load_nanochat_tokenizer(fixtures / "nanochat-head-d4" / "tokenizer")
    torch.manual_seed(4)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_checkpoint(tmp_path / "ckpt", 5, model, None, {}, tokenizer=tokenizer)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    for source, out in (("--checkpoint", "ckpt"), ("--hf-dir", "hf")):
        assert main(["eval", source, str(tmp_path / out), "--n", "12", "--json", str(tmp_path / f"{out}.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "hf"))
    assert a == b and a["metrics"]
    assert main(["eval", "--hf-dir", str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "ckpt")]) == 2
