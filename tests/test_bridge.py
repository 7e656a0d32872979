"""Export to HF NanoChatForCausalLM / import back / TransformerBridge: same logits, same activations."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files; never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_model import random_gpt  # noqa: E402
from transformers import NanoChatConfig, NanoChatForCausalLM  # noqa: E402

from aquainterp.checkpoints.huggingface import export_hf, import_hf, load_transformer_bridge  # noqa: E402
from aquainterp.model.gpt import GPT, GPTConfig  # noqa: E402

VOCAB = 96


def ids(batch=2, T=11, seed=1):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def hf_model(directory, attn="eager"):
    return NanoChatForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()


def compare_everything(model: GPT, directory, with_bridge: bool):
    """Ours vs HF (eager and SDPA) vs TransformerBridge: logits ≤ 1e-4, our pattern == HF attentions,
    and every hook both of us define holds the same activation."""
    x = ids()
    with torch.no_grad():
        ours, cache = model.run_with_cache(x)
        torch.testing.assert_close(model(x), ours, atol=1e-5, rtol=0)
        eager = hf_model(directory)(x, output_attentions=True)
        sdpa = hf_model(directory, "sdpa")(x).logits
    torch.testing.assert_close(eager.logits, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(sdpa, ours, atol=1e-4, rtol=0)
    for layer, attentions in enumerate(eager.attentions):
        torch.testing.assert_close(cache["pattern", layer], attentions, atol=1e-5, rtol=0)
    if not with_bridge:
        return
    bridge = load_transformer_bridge(directory)
    with torch.no_grad():
        torch.testing.assert_close(bridge(x), ours, atol=1e-4, rtol=0)
        _, bridge_cache = bridge.run_with_cache(x)
    shared = [k for k in cache.keys() if k in bridge_cache.cache_dict]
    # Only rot_q/rot_k are ours alone (the bridge delegates rotary+QK-norm to HF's attention), and
    # hook_embed_raw: the bridge's hook_embed is the raw embedding, ours is its RMSNorm (what enters the
    # residual stream, so TL's decompositions sum); both are checked against the bridge's.
    assert sorted(set(cache.keys()) - set(shared)) == sorted(
        [f"blocks.{l}.attn.hook_rot_{qk}" for l in range(model.config.n_layer) for qk in "qk"] + ["hook_embed_raw"]
    )
    torch.testing.assert_close(cache["hook_embed_raw"], bridge_cache["hook_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["hook_embed"], bridge_cache["blocks.0.hook_resid_pre"], atol=1e-5, rtol=0)
    shared.remove("hook_embed")
    for name in shared:
        if name.endswith("hook_attn_scores"):
            # With attention delegated to HF (NanoChat's QK-norm comes after rotary) TL 4.3's bridge fires
            # this hook with the softmaxed weights. Ours are TL's pre-softmax scores (scaled, -inf masked):
            # check they give the bridge's pattern.
            layer_pattern = bridge_cache[name.replace("hook_attn_scores", "hook_pattern")]
            torch.testing.assert_close(cache[name].softmax(-1), layer_pattern, atol=1e-5, rtol=0, msg=name)
            continue
        torch.testing.assert_close(cache[name], bridge_cache[name], atol=1e-4, rtol=1e-4, msg=name)


def test_export_matches_hf_and_bridge_with_gqa(tmp_path):
    model = random_gpt(
        GPTConfig.from_depth(2, vocab_size=VOCAB, sequence_len=64, aspect_ratio=64, head_dim=32, n_kv_head=2)
    )
    assert (model.config.n_head, model.config.n_kv_head) == (4, 2)
    compare_everything(model, export_hf(model, None, tmp_path / "hf"), with_bridge=True)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_export_matches_hf_and_bridge_depths_1_to_4(tmp_path, depth):
    model = random_gpt(GPTConfig.from_depth(depth, vocab_size=VOCAB, sequence_len=64), seed=depth)
    compare_everything(model, export_hf(model, None, tmp_path / "hf"), with_bridge=True)


def test_import_of_export_is_exact(tmp_path):
    model = random_gpt(GPTConfig.from_depth(3, vocab_size=VOCAB, sequence_len=64, n_kv_head=1))
    back = import_hf(export_hf(model, None, tmp_path / "hf"))
    assert back.config == model.config
    for name, tensor in model.state_dict().items():
        # exact by construction: export and import copy tensors, no arithmetic
        assert torch.equal(back.state_dict()[name], tensor), name
    with torch.no_grad():
        # exact on any CPU: equal weights through the same kernels on the same shapes
        assert torch.equal(back(ids()), model(ids()))


def test_exported_config_is_a_valid_nanochat_config(tmp_path):
    model = random_gpt(
        GPTConfig(sequence_len=48, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    )
    out = export_hf(model, None, tmp_path / "hf")
    cfg = NanoChatConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 256, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (2, 1, 48)
    assert cfg.rms_norm_eps == torch.finfo(torch.float32).eps  # nanochat's F.rms_norm default, not HF's 1e-6
    assert cfg.final_logit_softcapping == 15.0 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert not cfg.tie_word_embeddings
    assert sorted(load_file(out / "model.safetensors")) == sorted(
        ["model.embed_tokens.weight", "lm_head.weight"]
        + [
            f"model.layers.{l}.{m}.weight"
            for l in range(2)
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.fc1",
                "mlp.fc2",
            ]
        ]
    )


def test_import_errors_name_the_problem(tmp_path):
    model = random_gpt(
        GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    )
    out = export_hf(model, None, tmp_path / "hf")
    weights = out / "model.safetensors"
    state = load_file(weights)

    state["model.layers.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    save_file(state, weights)
    with pytest.raises(
        ValueError,
        match=r"'blocks.0.mlp.c_fc.weight': .*model.safetensors has shape \(128, 64\), model expects \(256, 64\)",
    ):
        import_hf(out)

    state["model.layers.0.mlp.fc1.weight"] = torch.zeros(256, 64)
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(
        ValueError, match=r"tensors NanoChat does not define: \['model.layers.0.mlp.gate_proj.weight'\]"
    ):
        import_hf(out)

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match=r"config.json: hidden_act = 'gelu', aquainterp's GPT needs 'relu2'"):
        import_hf(out)
    (out / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}})
    )
    with pytest.raises(ValueError, match="rope_parameters"):
        import_hf(out)
    with pytest.raises(FileNotFoundError, match="nowhere/config.json not found"):
        import_hf(tmp_path / "nowhere")


def test_import_keeps_hf_default_eps(tmp_path):
    """A config with HF's default eps (1e-6) imports with that eps: our logits equal HF's on that directory."""
    from transformers import NanoChatForCausalLM

    model = random_gpt(
        GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    )
    out = export_hf(model, None, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    back = import_hf(out)
    assert back.config.norm_eps == 1e-6
    hf = NanoChatForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids()), hf(ids()).logits, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:train_from_iterator")  # a small corpus runs out of merges: fine here
def test_export_with_tokenizer_gives_hf_and_bridge_the_same_tokens(tmp_path):
    from transformers import AutoTokenizer

    from aquainterp.tokenizer import Tokenizer

    texts = [f"Question {i}: what is {i} + {2 * i}? Answer: C) {3 * i} apples." for i in range(200)]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=512)
    model = random_gpt(
        GPTConfig(sequence_len=64, vocab_size=640, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)
    )
    out = export_hf(model, tok, tmp_path / "hf")
    assert Tokenizer.load(out).fingerprint() == tok.fingerprint()
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == tok.bos_token_id == tok.encode_special("<|bos|>")
    assert config["eos_token_id"] == tok.encode_special("<|assistant_end|>")
    text = "Question 7: what is 7 + 14? Answer: B) 21 pears."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok.encode(text)
    bridge = load_transformer_bridge(out)
    tokens = bridge.to_tokens(text)
    assert tokens[0].tolist() == tok.encode(text, prepend="<|bos|>")  # nanochat's documents start with BOS
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), model(tokens), atol=1e-4, rtol=0)
    small = random_gpt(
        GPTConfig(sequence_len=8, vocab_size=tok.vocab_size - 1, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    )
    with pytest.raises(
        ValueError,
        match=f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {tok.vocab_size - 1}",
    ):
        export_hf(small, tok, tmp_path / "x")


def test_export_command_writes_a_checkpoint_that_hf_loads(tmp_path, capsys):
    import argparse

    from aquainterp.checkpoints import huggingface
    from aquainterp.checkpoints.native import save_checkpoint

    model = random_gpt(
        GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=1, n_head=2, n_kv_head=1, n_embd=64)
    )
    save_checkpoint(tmp_path / "ckpt", 7, model, None, {})
    parser = argparse.ArgumentParser()
    huggingface.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--check"])
    assert huggingface.run(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'hf'} ({model.num_params():,} parameters)" in printed
    assert "max |logits(HF) - logits(ours)| = " in printed
    # exact on any CPU: equal weights through the same kernels on the same shapes
    assert torch.equal(import_hf(tmp_path / "hf")(ids()), model(ids()))
