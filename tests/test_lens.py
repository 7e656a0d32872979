"""GPT as a first-class TransformerLens model.

Part 1 ports TransformerLens's own ActivationCache acceptance tests (tests/acceptance/
test_activation_cache.py, written for solu-2l) to our GPT: same IOI-style prompts and answer pairs, same
checks, on a random GQA model and on a small trained checkpoint opened with load_model. Where solu-2l
has something we do not (pos_embed, an attention-only sibling) the check is adapted and says so.
Part 2 checks that the decompositions are exact (they sum to the residual stream; logit_attrs of the
full decomposition sum to the pre-soft-cap logits). Part 3 runs the TL tutorial calls (tokenizer
methods, return_type, evals.sanity_check, head_detector.detect_head, utilities.test_prompt,
patching.get_act_patch_direct_path, logit lens) and compares them with TransformerLens's own
TransformerBridge on the exported HF model. Part 4: the opt-in hooks.
"""

import os
import random
import re
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformer_lens import evals, head_detector, patching  # noqa: E402
from transformer_lens import utilities as tl_utils  # noqa: E402
from transformer_lens.utilities import Slice  # noqa: E402
from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss  # noqa: E402

from aquainterp.checkpoints.huggingface import export_hf, load_transformer_bridge  # noqa: E402
from aquainterp.checkpoints.load import load_model  # noqa: E402
from aquainterp.checkpoints.native import save_checkpoint
from aquainterp.model.gpt import GPT, GPTConfig  # noqa: E402
from aquainterp.tokenizer import Tokenizer  # noqa: E402

IOI_FORMATS = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
IOI_NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
SANITY_TEXT = (
    "Many important transition points in the history of science have been moments when science 'zoomed in.' "
    "At these points, we develop a visualization or tool that allows us to see the world in a new level of "
    "detail, and a new field of science develops to study the world through this lens."
)


def corpus(n=600, seed=0):
    """IOI sentences with their answer, plus the sanity-check paragraph (so its words are tokens)."""
    rng = random.Random(seed)
    names = [n.strip() for pair in IOI_NAMES for n in pair]
    texts = []
    for _ in range(n):
        fmt = rng.choice(IOI_FORMATS)
        a, b = rng.sample(names, 2)
        texts.append(fmt.format(" " + b) + " " + a + ".")
    return texts + [SANITY_TEXT] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        return Tokenizer.train_from_iterator(corpus(), vocab_size=600)


def ioi_tokens_and_answers(model):
    """TL's get_ioi_tokens_and_answer_tokens: 8 prompts, (correct, incorrect) single-token answers."""
    prompts, answer_tokens = [], []
    for fmt, names in zip(IOI_FORMATS, IOI_NAMES):
        for j in range(2):
            correct, incorrect = names[j], names[1 - j]
            answer_tokens.append((model.to_single_token(correct), model.to_single_token(incorrect)))
            prompts.append(fmt.format(incorrect))
    return model.to_tokens(prompts, prepend_bos=True), torch.tensor(answer_tokens)


def random_model(tok, n_kv_head=2, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                          n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.wte.weight else p.shape[-1] ** -0.5)
    model.set_tokenizer(tok)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint_dir(tok, tmp_path_factory):
    """A small trained checkpoint (nanochat init, 120 AdamW steps on the IOI corpus), saved with its
    tokenizer: the stand-in for the demo's checkpoints, opened through load_model as a user would."""
    threads = torch.get_num_threads()  # module fixtures run before conftest's one-thread fixture
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tok.vocab_size, sequence_len=64, head_dim=32))
    model.init_weights()
    rows = [tok.encode(t, prepend=tok.bos_token_id) for t in corpus(seed=1)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    gen = random.Random(0)
    for _ in range(120):
        batch = gen.sample(rows, 16)
        T = max(map(len, batch))
        x = torch.tensor([r + [tok.bos_token_id] * (T - len(r)) for r in batch])
        y = torch.tensor([r[1:] + [-1] * (T - len(r) + 1) for r in batch])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(out, 120, model, None, {}, tokenizer=tok)
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module", params=["random", "trained"])
def model(request, tok, checkpoint_dir) -> GPT:
    if request.param == "random":
        return random_model(tok)
    return load_model(checkpoint_dir)[0]


@pytest.fixture(scope="module")
def run(model):
    tokens, answers = ioi_tokens_and_answers(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return tokens, answers, cache


# ---------------------------------------------------------------- 1. TL's ActivationCache acceptance tests


@torch.no_grad()
def test_logit_attrs_matches_reference_code(model, run):
    tokens, answer_tokens, cache = run
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    directions = model.tokens_to_residual_directions(answer_tokens)
    diff_directions = directions[:, 0] - directions[:, 1]
    scaled = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
    reference = torch.einsum("cbd,bd->c", scaled, diff_directions) / len(tokens)
    ours = cache.logit_attrs(accumulated, pos_slice=-1, tokens=answer_tokens[:, 0],
                             incorrect_tokens=answer_tokens[:, 1]).mean(dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_accumulated_resid_last_layer_variants_and_labels(model, run):
    _, _, cache = run
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    # exact by construction: the same cached tensors stacked (layer -1, n_layers and None are one layer)
    assert torch.equal(stack, cache.accumulated_resid(layer=model.cfg.n_layers, incl_mid=True, pos_slice=-1))
    assert torch.equal(stack, cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=-1))
    no_mid, labels = cache.accumulated_resid(layer=-1, incl_mid=False, pos_slice=-1, return_labels=True)
    assert len(labels) == no_mid.size(0) == model.cfg.n_layers + 1
    assert all("mid" not in label for label in labels)


@torch.no_grad()
def test_logit_attrs_works_for_all_input_shapes(model, run):
    _, answer_tokens, cache = run
    accumulated = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    directions = model.tokens_to_residual_directions(answer_tokens)
    diff_directions = directions[:, 0] - directions[:, 1]
    scaled = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
    reference = torch.einsum("cbd,bd->cb", scaled, diff_directions)

    def attrs(stack, **kw):
        return cache.logit_attrs(stack, pos_slice=-1, **kw)

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attrs(accumulated, tokens=answer_tokens[:, 0], incorrect_tokens=answer_tokens[:, 1]),
                               reference, **close)
    b = -1
    torch.testing.assert_close(attrs(accumulated, batch_slice=b, tokens=answer_tokens[b, 0],
                                     incorrect_tokens=answer_tokens[b, 1]), reference[:, b], **close)
    torch.testing.assert_close(attrs(accumulated, batch_slice=Slice(b), tokens=int(answer_tokens[b, 0]),
                                     incorrect_tokens=int(answer_tokens[b, 1])), reference[:, b], **close)
    as_str = attrs(accumulated, batch_slice=b, tokens=model.to_string(answer_tokens[b, 0]),
                   incorrect_tokens=model.to_string(answer_tokens[b, 1]))
    torch.testing.assert_close(as_str, reference[:, b], **close)
    torch.testing.assert_close(attrs(accumulated[:, b, :], has_batch_dim=False, batch_slice=b,
                                     tokens=answer_tokens[b, 0], incorrect_tokens=answer_tokens[b, 1]),
                               reference[:, b], **close)
    rows = [2, 5, 7]
    torch.testing.assert_close(attrs(accumulated, batch_slice=rows, tokens=answer_tokens[rows, 0],
                                     incorrect_tokens=answer_tokens[rows, 1]), reference[:, rows], **close)
    with pytest.raises(ValueError, match="same shape"):
        attrs(accumulated[:, rows, :], has_batch_dim=False, batch_slice=rows, tokens=answer_tokens[rows, 0],
              incorrect_tokens=answer_tokens[rows, 0:1])
    no_incorrect = torch.einsum("cbd,bd->cb", scaled, directions[:, 0])
    torch.testing.assert_close(attrs(accumulated, tokens=answer_tokens[:, 0]), no_incorrect, **close)


@torch.no_grad()
def test_apply_ln_options_equal_apply_ln_to_stack(model, run):
    _, _, cache = run
    last = Slice(-1)
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    # TL 4.x changed this one (its "#1076 fix"): into the unembed, apply_ln=True runs ln_final on each entry
    # with that entry's own statistics (logit-lens semantics), no longer the cached final scale the solu-2l
    # test divided by. Checked here against ln_final itself; the last entry is ln_final's own output.
    reference = torch.stack([model.ln_final(entry) for entry in stack])
    torch.testing.assert_close(cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True),
                               reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reference[-1], cache["ln_final.hook_normalized"][:, -1], atol=1e-6, rtol=1e-6)
    again, labels = cache.accumulated_resid(layer=None, incl_mid=True, pos_slice=last, apply_ln=True,
                                            return_labels=True)
    torch.testing.assert_close(again, reference, atol=1e-6, rtol=1e-6)
    assert labels == [f"{l}_{s}" for l in range(model.cfg.n_layers) for s in ("pre", "mid")] + ["final_post"]

    parts = cache.decompose_resid(layer=-1, pos_slice=-1)
    torch.testing.assert_close(cache.decompose_resid(layer=None, pos_slice=last, apply_ln=True),
                               cache.apply_ln_to_stack(parts, layer=-1, pos_slice=-1), atol=1e-7, rtol=0)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    torch.testing.assert_close(cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True),
                               cache.apply_ln_to_stack(heads, layer=None, pos_slice=last), atol=1e-7, rtol=0)
    neurons = cache.stack_neuron_results(layer=-1, pos_slice=-1)
    torch.testing.assert_close(cache.stack_neuron_results(layer=-1, pos_slice=last, apply_ln=True),
                               cache.apply_ln_to_stack(neurons, layer=-1, pos_slice=-1), atol=1e-7, rtol=0)


@torch.no_grad()
def test_decompose_resid_including_attention(model, run):
    _, _, cache = run
    reference = torch.stack([cache["attn_out", l][:, -1] for l in range(model.cfg.n_layers)])
    stack = cache.decompose_resid(layer=1, pos_slice=Slice(-1), mlp_input=True, incl_embeds=False, mode="attn")
    torch.testing.assert_close(stack, reference, atol=1e-7, rtol=0)


@torch.no_grad()
def test_stack_head_and_neuron_results_with_remainder(model, run):
    _, _, cache = run
    resid0 = cache["resid_post", 0][None, :, -1]
    heads, labels = cache.stack_head_results(layer=1, pos_slice=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(heads[-1], resid0[0] - heads[:-1].sum(0))
    assert labels == [f"L0H{h}" for h in range(model.cfg.n_heads)] + ["remainder"]
    whole, labels = cache.stack_head_results(layer=0, pos_slice=-1, incl_remainder=True, return_labels=True)
    torch.testing.assert_close(whole, cache["resid_post", -1][None, :, -1], atol=1e-7, rtol=0)
    assert labels == ["remainder"]
    empty, labels = cache.stack_head_results(layer=0, pos_slice=-1, return_labels=True)
    assert empty.shape[0] == 0 and labels == []

    neurons, labels = cache.stack_neuron_results(layer=1, pos_slice=Slice(-1), incl_remainder=True,
                                                 return_labels=True)
    torch.testing.assert_close(neurons[-1], resid0[0] - neurons[:-1].sum(0))
    assert labels == [f"L0N{i}" for i in range(model.cfg.d_mlp)] + ["remainder"]
    _, labels = cache.stack_neuron_results(layer=1, pos_slice=Slice(-1), neuron_slice=Slice([0, 1, 2]),
                                           return_labels=True)
    assert labels == ["L0N0", "L0N1", "L0N2"]


@torch.no_grad()
def test_batch_dim_handling(model, run):
    tokens, _, cache = run
    _, one = model.run_with_cache(tokens[:1])
    shapes = {k: v.shape for k, v in one.items()}
    for _ in range(2):  # removing twice changes nothing more
        one.remove_batch_dim()
        assert not one.has_batch_dim
        assert all(one[k].shape == shapes[k][1:] for k in shapes)
    with pytest.raises(AssertionError, match="Cannot remove batch dimension from cache with batch size 8"):
        cache.apply_slice_to_batch_dim(Slice(None)).remove_batch_dim()
    sliced = cache.apply_slice_to_batch_dim(Slice((2, 4)))
    # exact by construction: slices of the same cached tensors
    assert sliced.has_batch_dim and all(torch.equal(cache[k][2:4], sliced[k]) for k in cache.cache_dict)
    single = cache.apply_slice_to_batch_dim(2)
    assert not single.has_batch_dim and all(torch.equal(cache[k][2], single[k]) for k in cache.cache_dict)


@torch.no_grad()
def test_retrieve_items_keys_values_and_stack_activation(model, run):
    _, _, cache = run
    n = model.cfg.n_layers
    # exact by construction: one cached tensor under two names
    assert torch.equal(cache["scale", 1, "ln1"], cache[tl_utils.get_act_name("scale", 1, "ln1")])
    assert torch.equal(cache["scale", -1, "ln1"], cache[f"blocks.{n - 1}.ln1.hook_scale"])
    assert torch.equal(cache["k", -1, None], cache[f"blocks.{n - 1}.attn.hook_k"])
    assert torch.equal(cache["embed"], cache["hook_embed"]) and torch.equal(cache["embed", None], cache["hook_embed"])
    assert list(cache.keys()) == list(cache.cache_dict.keys())
    assert all(torch.equal(a, b) for a, b in zip(cache.values(), cache.cache_dict.values()))
    stack = cache.stack_activation("scale", -1, "ln1")
    assert all(torch.equal(cache["scale", l, "ln1"], stack[l]) for l in range(n))
    assert cache.stack_activation("scale", 1, "ln1").shape[0] == 1
    was = torch.is_grad_enabled()
    cache.toggle_autodiff(mode=True)
    assert torch.is_grad_enabled()
    torch.set_grad_enabled(was)


@torch.no_grad()
def test_get_full_resid_decomposition_parts(model, run):
    """TL's test, without its pos_embed row: our model has rotary positions, so the stack is heads, MLPs
    (or neurons), embed and bias, and no pos_embed label appears."""
    _, _, cache = run
    n, last = model.cfg.n_layers, Slice(-1)
    heads, head_labels = cache.stack_head_results(layer=n, pos_slice=last, apply_ln=True, return_labels=True)
    mlps, mlp_labels = cache.decompose_resid(layer=n, pos_slice=last, incl_embeds=False, mode="mlp",
                                             apply_ln=True, return_labels=True)
    embed = cache.apply_ln_to_stack(cache["embed"][None, :, -1], pos_slice=last)
    bias = model.accumulated_bias(n, include_mlp_biases=False).expand((1,) + heads.shape[1:])
    stack, labels = cache.get_full_resid_decomposition(layer=-1, pos_slice=-1, apply_ln=True, expand_neurons=False,
                                                       return_labels=True)
    h, m = len(heads), len(mlps)
    torch.testing.assert_close(stack[:h], heads, atol=1e-7, rtol=0)
    torch.testing.assert_close(stack[h:h + m], mlps, atol=1e-7, rtol=0)
    torch.testing.assert_close(stack[h + m:h + m + 1], embed, atol=1e-7, rtol=0)
    torch.testing.assert_close(stack[h + m + 1:], cache.apply_ln_to_stack(bias, pos_slice=last), atol=1e-7, rtol=0)
    assert labels == head_labels + mlp_labels + ["embed", "bias"]

    heads1 = cache.stack_head_results(layer=1, pos_slice=last, apply_ln=True)
    neurons, neuron_labels = cache.stack_neuron_results(1, pos_slice=last, return_labels=True)
    expanded, labels = cache.get_full_resid_decomposition(layer=1, pos_slice=last, apply_ln=True,
                                                          expand_neurons=True, return_labels=True)
    h1, k = len(heads1), len(neurons)
    torch.testing.assert_close(expanded[h1:h1 + k], cache.apply_ln_to_stack(neurons, layer=1, pos_slice=last),
                               atol=1e-7, rtol=0)
    assert labels[h1:h1 + k] == neuron_labels
    raw = cache.get_full_resid_decomposition(layer=1, pos_slice=last, apply_ln=False, expand_neurons=True)
    torch.testing.assert_close(raw[h1:h1 + k], neurons, atol=1e-7, rtol=0)


@torch.no_grad()
def test_compute_head_results_and_neuron_results(model, run):
    tokens, _, _ = run
    _, cache = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in cache.cache_dict
    cache.compute_head_results()
    result = cache.cache_dict["blocks.0.attn.hook_result"]
    torch.testing.assert_close(result.sum(-2), cache["attn_out", 0], atol=1e-5, rtol=1e-5)
    result[0, 0, 0, 0] = float("inf")
    cache.compute_head_results()  # does not recompute what is there
    assert cache.cache_dict["blocks.0.attn.hook_result"][0, 0, 0, 0] == float("inf")
    W_out = model.blocks[1].mlp.W_out
    reference = cache["blocks.1.mlp.hook_post"][:, -1, :2, None] * W_out[:2]
    torch.testing.assert_close(cache.get_neuron_results(1, neuron_slice=[0, 1], pos_slice=-1), reference)
    torch.testing.assert_close(cache.get_neuron_results(1), cache["blocks.1.mlp.hook_post"][..., None] * W_out)


# ---------------------------------------------------------------- 2. exact decompositions


@torch.no_grad()
def test_decompositions_sum_to_the_residual_stream(model, run):
    tokens, answers, cache = run
    final = cache["resid_post", -1]
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed"
    torch.testing.assert_close(parts.sum(0), final, atol=1e-5, rtol=0)
    for expand in (False, True):  # fp32: 512 neuron rows summed in another order than the matmul's
        full = cache.get_full_resid_decomposition(expand_neurons=expand)
        torch.testing.assert_close(full.sum(0), final, atol=1e-5, rtol=1e-6)
    # Into a middle layer's MLP: the stream ln2 normalises.
    mid = cache.get_full_resid_decomposition(layer=1, mlp_input=True)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.decompose_resid(layer=1).sum(0), cache["resid_pre", 1], atol=1e-5, rtol=0)
    # Direct logit attribution: the attributions of every component sum to the logit before the soft-cap.
    logits = model(tokens)[:, -1]
    raw = 15 * torch.atanh(logits / 15)
    attrs = cache.logit_attrs(cache.get_full_resid_decomposition(pos_slice=-1), tokens=answers[:, 0], pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), raw.gather(1, answers[:, :1])[:, 0], atol=1e-4, rtol=1e-5)
    # TL's direct_logit_attribution tool (decompose_resid + logit_attrs): components sum to the logit difference
    from transformer_lens.tools.analysis.direct_logit_attribution import direct_logit_attribution

    dla = direct_logit_attribution(model, tokens, answers[:, 0], answers[:, 1])
    assert dla.labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    expected = raw.gather(1, answers[:, :1])[:, 0] - raw.gather(1, answers[:, 1:])[:, 0]
    torch.testing.assert_close(dla.attribution.sum(0), expected, atol=1e-4, rtol=1e-5)
    # ... and the soft-capped unembed of ln_final is the model's logits.
    capped = model.adapter.apply_output_logits_transform(model.unembed(cache["ln_final.hook_normalized"]))
    torch.testing.assert_close(capped, model(tokens), atol=1e-5, rtol=0)


@torch.no_grad()
def test_hook_embed_is_what_enters_the_stream_and_raw_embedding_is_documented(model, run):
    tokens, _, cache = run
    torch.testing.assert_close(cache["hook_embed_raw"], model.W_E[tokens])
    torch.testing.assert_close(cache["hook_embed"], torch.nn.functional.rms_norm(model.W_E[tokens], (model.cfg.d_model,)))
    # exact by construction: resid_pre 0 is hook_embed's output, the same tensor
    assert torch.equal(cache["hook_embed"], cache["resid_pre", 0])


def test_decompositions_are_exact_in_float64(checkpoint_dir):
    """The fp32 residue above is rounding: in float64 the stack sums to the stream to 1e-10."""
    model = load_model(checkpoint_dir)[0].to(torch.float64)
    tokens, _ = ioi_tokens_and_answers(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    final = cache["resid_post", -1]
    assert final.dtype == torch.float64
    torch.testing.assert_close(cache.decompose_resid().sum(0), final, atol=1e-10, rtol=0)
    torch.testing.assert_close(cache.get_full_resid_decomposition().sum(0), final, atol=1e-10, rtol=0)


def test_decompositions_refused_on_nanochat_2026(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64, architecture="nanochat-2026-07"))
    model.init_weights()
    model.set_tokenizer(tok)
    with torch.no_grad():
        _, cache = model.eval().run_with_cache(model.to_tokens("When John and Mary went to the shops"))
    assert "resid_lambdas" in model.residual_decomposition_problem()
    for call in (lambda: cache.decompose_resid(), lambda: cache.get_full_resid_decomposition(),
                 lambda: cache.accumulated_resid(), lambda: cache.logit_attrs(cache["resid_post", -1][None], 5)):
        with pytest.raises(ValueError, match=r"refused: nanochat-2026-07 scales the residual stream .*backout"):
            call()
    # What it refuses really does not sum: embed + attn_out + mlp_out misses the stream.
    plain = cache["hook_embed"] + sum(cache["attn_out", l] + cache["mlp_out", l] for l in range(2))
    assert (plain - cache["resid_post", -1]).abs().max() > 1e-2
    # TL's direct-path patching adds a head's z @ W_O to a later head's input; on 2026-07 the write arrives
    # scaled by resid_lambdas, so TL refuses it and says why (and leaves the caller's switch off)
    tokens = model.to_tokens("When John and Mary went to the shops")
    with pytest.raises(ValueError, match=r"resid_lambdas before every later block \(nanochat-2026-07\).*direct "
                                         r"path patching is unsupported"):
        patching.get_act_patch_direct_path(model, tokens, cache, cache, lambda logits: logits[0, -1, 0],
                                           src_layer=0, src_head=1, verbose=False)
    assert not model.cfg.use_split_qkv_input
    assert GPT(GPTConfig(sequence_len=64, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2,
                         n_embd=64)).blocks[0].residual_contribution_scale == 1.0


# ---------------------------------------------------------------- 3. the tutorial calls


def test_model_satisfies_transformer_lens_protocols(tok):
    from transformer_lens.model_protocol import TrainableTransformerLensModel, TransformerLensModelWithWeights

    model = random_model(tok)
    assert isinstance(model, TransformerLensModelWithWeights) and isinstance(model, TrainableTransformerLensModel)


def test_tokenizer_methods(tok):
    model = random_model(tok)
    bos = tok.bos_token_id
    text = "When John and Mary went to the shops"
    ids = tok.encode(text)
    assert model.to_tokens(text).tolist() == [[bos] + ids]
    assert model.to_tokens(text, prepend_bos=False).tolist() == [ids]
    assert model.to_str_tokens(text) == [tok.decode([bos])] + [tok.decode([i]) for i in ids]
    assert "".join(model.to_str_tokens(text, prepend_bos=False)) == text
    assert model.to_str_tokens(torch.tensor([ids])) == model.to_str_tokens(text, prepend_bos=False)
    assert model.to_string(torch.tensor(ids)) == text
    assert model.to_string(torch.tensor([ids, ids])) == [text, text]
    assert model.to_single_token(" Mary") == tok.encode(" Mary")[0]
    with pytest.raises(ValueError, match="is not a single token"):
        model.to_single_token(text)
    short, long = "When John", text
    right = model.to_tokens([short, long])
    left = model.to_tokens([short, long], padding_side="left")
    n = len(tok.encode(short)) + 1
    assert right[0, :n].tolist() == left[0, -n:].tolist() == [bos] + tok.encode(short)
    pad = tok.encode_special("<|assistant_end|>")  # model.tokenizer.pad_token_id, as TL pads
    assert model.tokenizer.pad_token_id == pad
    assert (right[0, n:] == pad).all() and (left[0, :-n] == pad).all()
    assert model.get_token_position(" Mary", text) == 4  # <|bos|> When John and Mary
    bare = GPT(GPTConfig(sequence_len=16, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with pytest.raises(ValueError, match="no tokenizer; load_model attaches"):
        bare.to_tokens("x")
    small = GPT(GPTConfig(sequence_len=16, vocab_size=tok.vocab_size - 1, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with pytest.raises(ValueError, match=f"has {tok.vocab_size} tokens but the model's vocabulary is"):
        small.set_tokenizer(tok)


def test_load_model_attaches_the_tokenizer(checkpoint_dir, tok):
    model, tokenizer, _ = load_model(checkpoint_dir)
    assert model.native_tokenizer is tokenizer and tokenizer.fingerprint() == tok.fingerprint()
    assert model.cfg.tokenizer_name == f"aquainterp-bpe-{tok.fingerprint()[:12]}"


def test_import_hf_attaches_an_exported_tokenizer(checkpoint_dir, tmp_path):
    import json

    from aquainterp.checkpoints.huggingface import import_hf

    model, tokenizer, _ = load_model(checkpoint_dir)
    back = import_hf(export_hf(model, tokenizer, tmp_path / "hf"))
    assert back.native_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert back.to_tokens("When John").tolist() == model.to_tokens("When John").tolist()
    bare = import_hf(export_hf(model, None, tmp_path / "bare"))
    assert bare.tokenizer is None
    (tmp_path / "bare" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.warns(UserWarning, match="tokenizer not attached .*not an aquainterp tokenizer.json"):
        assert import_hf(tmp_path / "bare").tokenizer is None


@torch.no_grad()
def test_forward_return_types_match_tl_semantics(tok):
    model = random_model(tok)
    prompts = ["When John and Mary went to the shops, John gave the bag to", "After Amy went to the park"]
    tokens = model.to_tokens(prompts)
    logits = model(tokens)
    torch.testing.assert_close(model(prompts), logits, atol=1e-6, rtol=0)
    # TL's next-token loss, padding (right) excluded; computed here by hand
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        mask[i, : len(tok.encode(p)) + 1] = True
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    keep = mask[:, :-1] & mask[:, 1:]
    by_hand = -(logp * keep).sum() / keep.sum()
    torch.testing.assert_close(model(prompts, return_type="loss"), by_hand, atol=1e-5, rtol=0)
    whole = -logp.mean()  # token input: no padding mask, every position counts, as TL
    torch.testing.assert_close(model(tokens, return_type="loss"), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(tokens, "loss"), whole, atol=1e-5, rtol=0)
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(per_token, -logp, atol=1e-5, rtol=0)
    both = model(tokens, return_type="both")
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], whole, atol=1e-5, rtol=0)
    assert model(tokens, return_type=None) is None
    torch.testing.assert_close(lm_cross_entropy_loss(logits, tokens), whole, atol=1e-5, rtol=0)
    # left padding: each row's logits are what it gives alone
    left = model(prompts, padding_side="left")
    short = model(prompts[1])
    torch.testing.assert_close(left[1, -short.shape[1]:], short[0], atol=1e-5, rtol=0)
    # nanochat's call style is unchanged
    torch.testing.assert_close(model(tokens, tokens), torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), tokens.view(-1)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="return_type must be"):
        model(tokens, return_type="probs")
    with pytest.raises(ValueError, match="pass one or the other"):
        model(tokens, tokens, return_type="loss")


def test_run_with_hooks_loss_and_cache_with_backward(tok):
    model = random_model(tok)
    tokens = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    hooked = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert hooked.ndim == 0 and not torch.isclose(hooked, model(tokens, return_type="loss"))
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    grad = cache["blocks.1.hook_resid_post_grad"]
    # the gradient the cache holds is d loss / d resid_post, checked through autograd directly
    resid = cache["resid_post", 1].detach().requires_grad_(True)
    again = lm_cross_entropy_loss(model.adapter.apply_output_logits_transform(model.unembed(model.ln_final(resid))),
                                  tokens)
    (direct,) = torch.autograd.grad(again, resid)
    torch.testing.assert_close(grad, direct, atol=1e-6, rtol=1e-5)
    model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def bridge_pair(tok, checkpoint_dir, tmp_path_factory):
    """Our trained checkpoint and TransformerLens's TransformerBridge on its HF export (with tokenizer)."""
    model, tokenizer, _ = load_model(checkpoint_dir)
    out = export_hf(model, tokenizer, tmp_path_factory.mktemp("hf") / "hf")
    bridge = load_transformer_bridge(out)
    bridge.eval()
    return model, bridge


@torch.no_grad()
def test_sanity_check_detect_head_and_test_prompt_agree_with_the_bridge(bridge_pair, capsys):
    model, bridge = bridge_pair
    # exact by construction: integer token ids
    assert torch.equal(model.to_tokens(SANITY_TEXT), bridge.to_tokens(SANITY_TEXT).cpu())
    ours = evals.sanity_check(model)
    torch.testing.assert_close(ours, evals.sanity_check(bridge), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, model(model.to_tokens(SANITY_TEXT), return_type="loss"))
    assert ours < 6.0  # the paragraph is in the training corpus (a random model scores about log(vocab) = 6.4)

    prompt = "When John and Mary went to the shops, John gave the bag to When John and Mary went"
    for name in ("previous_token_head", "duplicate_token_head", "induction_head"):
        scores = head_detector.detect_head(model, prompt, name)
        torch.testing.assert_close(scores, head_detector.detect_head(bridge, prompt, name), atol=1e-4, rtol=0)
    # hand check of one score: the share of attention on the previous token, over the rows, per head
    _, cache = model.run_with_cache(prompt, remove_batch_dim=True)
    pattern = cache["pattern", 1]  # [head, q, k]
    prev = torch.stack([pattern[:, i, i - 1] for i in range(1, pattern.shape[1])], dim=1)
    per_head = prev.sum(1) / pattern.sum((1, 2))
    torch.testing.assert_close(head_detector.detect_head(model, prompt, "previous_token_head")[1], per_head,
                               atol=1e-5, rtol=0)

    def printed(m):
        tl_utils.test_prompt("When John and Mary went to the shops, John gave the bag to", "Mary", m, top_k=5)
        return capsys.readouterr().out

    ours, theirs = printed(model), printed(bridge)
    line = re.compile(r"(Rank: \d+|Top \d+th token\.)\s+Logit:\s+([-\d.]+) Prob:\s+([\d.]+)% Token: \|(.*)\|")
    got, want = line.findall(ours), line.findall(theirs)
    assert len(got) == 6 and [(r, t) for r, _, _, t in got] == [(r, t) for r, _, _, t in want]
    for (_, lo, po, _), (_, lt, pt, _) in zip(got, want):
        assert abs(float(lo) - float(lt)) <= 0.011 and abs(float(po) - float(pt)) <= 0.011
    assert "Tokenized answer: [' Mary']" in ours and ours.count("Top ") == 5


@torch.no_grad()
def test_direct_path_patching_and_logit_lens_agree_with_the_bridge(bridge_pair):
    model, bridge = bridge_pair
    clean = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    corrupt = model.to_tokens("When John and Mary went to the shops, Mary gave the bag to")
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    _, clean_cache = model.run_with_cache(clean)
    _, corrupt_cache = model.run_with_cache(corrupt)
    ours = patching.get_act_patch_direct_path(model, corrupt, clean_cache, corrupt_cache, metric,
                                              src_layer=0, src_head=1, verbose=False)
    assert not model.cfg.use_split_qkv_input  # the sweep put the caller's flag back
    # TL 4.3's bridge refuses this sweep on NanoChat (its AttentionBridge has no pre-Q/K/V fork), so the
    # reference is the edge intervention written out: on the corrupted run, replace head h's queries at
    # layer 1 by those of ln1(resid_pre + δ), δ = (z_clean - z_corrupt)[head 1] @ W_O[0, 1].
    with pytest.raises(NotImplementedError, match="use_split_qkv_input"):
        _, b_clean = bridge.run_with_cache(clean)
        _, b_corrupt = bridge.run_with_cache(corrupt)
        patching.get_act_patch_direct_path(bridge, corrupt, b_clean, b_corrupt, metric, 0, 1, verbose=False)
    z = "blocks.0.attn.hook_z"
    delta = (clean_cache[z][:, :, 1] - corrupt_cache[z][:, :, 1]) @ model.W_O[0, 1]
    resid = corrupt_cache["resid_pre", 1] + delta
    q_patched = torch.einsum("bpm,hmd->bphd", torch.nn.functional.rms_norm(resid, (resid.shape[-1],)),
                             model.W_Q[1])
    for head in range(model.cfg.n_heads):
        def swap(q, hook, head=head):
            q = q.clone()
            q[:, :, head] = q_patched[:, :, head]
            return q
        expected = metric(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.attn.hook_q", swap)]))
        torch.testing.assert_close(ours[1, head], expected, atol=1e-4, rtol=0)
    assert (ours[0] == 0).all() and (ours[1] != metric(model(corrupt))).any()

    _, cache = model.run_with_cache(clean)
    lens = cache.logit_lens(targets=" Mary")
    assert lens.labels == ["0_pre", "1_pre", "final_post"]
    # its final entry is the model's own (soft-capped) logit
    torch.testing.assert_close(lens.values[-1, 0, 0], model(clean)[0, -1, mary], atol=1e-5, rtol=0)
    _, bridge_cache = bridge.run_with_cache(clean)
    torch.testing.assert_close(lens.values[1:], bridge_cache.logit_lens(targets=" Mary").values[1:], atol=1e-4, rtol=0)
    from transformer_lens.tools.analysis.logit_lens import logit_lens

    ran = logit_lens(model, "When John and Mary went to the shops, John gave the bag to", targets=" Mary")
    torch.testing.assert_close(ran.values, lens.values, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- 4. weights and opt-in hooks


@torch.no_grad()
def test_weight_views_in_tl_shapes_with_gqa_heads_expanded(tok):
    model = random_model(tok, n_kv_head=2)
    L, H, D, d = 2, 4, 64, 16
    assert model.W_Q.shape == model.W_K.shape == model.W_V.shape == (L, H, D, d)
    assert model.W_O.shape == (L, H, d, D) and model.W_in.shape == (L, D, 4 * D) and model.W_out.shape == (L, 4 * D, D)
    for b, shape in (("b_Q", (L, H, d)), ("b_K", (L, H, d)), ("b_V", (L, H, d)), ("b_O", (L, D)),
                     ("b_in", (L, 4 * D)), ("b_out", (L, D))):
        assert getattr(model, b).shape == shape and not getattr(model, b).any(), b
    assert model.b_U.shape == (tok.vocab_size,) and not model.b_U.any() and not model.accumulated_bias(2).any()
    assert (model.cfg.rotary_dim, model.cfg.use_qk_norm, model.cfg.original_architecture) == (16, True,
                                                                                          "NanoChatForCausalLM")
    assert model.cfg.output_logits_soft_cap == 15.0 and model.cfg.d_vocab_out == tok.vocab_size
    tokens = model.to_tokens("When John and Mary went to the shops")
    _, cache = model.run_with_cache(tokens)
    # head 3 reads kv head 1 (heads 2 and 3 share it): OV of head 3 maps ln1's output to its result
    h = cache["normalized", 0, "ln1"]
    z3 = cache["pattern", 0][:, 3] @ cache["v", 0][:, :, 1]
    torch.testing.assert_close(cache["pattern", 0][:, 3] @ (h @ model.OV[0, 3].AB), z3 @ model.W_O[0, 3],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", h, model.W_Q[0]), cache["q", 0])
    # exact by construction: shared kv heads and unembedding columns are views of the same weights
    assert torch.equal(model.W_K[0, 2], model.W_K[0, 3]) and torch.equal(model.W_K[0, 3], model.blocks[0].attn._W_K[1])
    assert model.QK.AB.shape == (L, H, D, D)
    dirs = model.tokens_to_residual_directions(torch.tensor([[3, 4], [5, 6]]))
    assert dirs.shape == (2, 2, D) and torch.equal(dirs[1, 0], model.W_U[:, 5])
    assert torch.equal(model.tokens_to_residual_directions(" Mary"), model.W_U[:, model.to_single_token(" Mary")])


@torch.no_grad()
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_opt_in_hooks_fire_only_when_switched_on_and_keep_the_numbers(tok, n_kv_head):
    model = random_model(tok, n_kv_head=n_kv_head)
    tokens = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    base, base_cache = model.run_with_cache(tokens)
    opt_in = {"hook_tokens", "attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in",
              "hook_mlp_in"}
    assert not any(k.endswith(tuple(opt_in)) for k in base_cache.keys())
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_hook_tokens(True)
    try:
        logits, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(logits, base, atol=1e-5, rtol=0)
        # exact by construction: token ids and residual-stream copies, no arithmetic
        assert torch.equal(cache["hook_tokens"], tokens)
        torch.testing.assert_close(cache["result", 1].sum(-2), cache["attn_out", 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache["result", 1], base_cache.stack_head_results(2)[4:].permute(1, 2, 0, 3),
                                   atol=1e-5, rtol=0)
        assert cache["q_input", 0].shape == (1, tokens.shape[1], 4, 64)
        assert cache["k_input", 0].shape == cache["v_input", 0].shape == (1, tokens.shape[1], n_kv_head, 64)
        assert torch.equal(cache["q_input", 1][:, :, 2], cache["resid_pre", 1])
        assert torch.equal(cache["mlp_in", 0], cache["resid_mid", 0])
        # what ln2 reads is hook_mlp_in's output; resid_mid is kept (an in-place edit does not reach it):
        # zeroing it zeroes the MLP's write (ReLU²(0) = 0, no biases), so resid_post = resid_mid
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", lambda act, hook: act.zero_())]):
            _, zeroed = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.hook_"))
        assert not zeroed["mlp_out", 0].any() and zeroed["resid_mid", 0].abs().sum() > 0
        # exact by construction: resid_mid + 0 (the zeroed MLP writes exact zeros)
        assert torch.equal(zeroed["resid_post", 0], zeroed["resid_mid", 0])
        # a change to head 2's q input moves head 2's queries only; the alias TL 4.x patching uses works
        bump = lambda act, hook: act + torch.where(torch.arange(4)[:, None] == 2, 1.0, 0.0)  # noqa: E731
        _, bumped = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_q_input", bump)])
        with model.hooks(fwd_hooks=[("blocks.1.hook_q_input", bump)]):
            _, moved = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q")
        changed = (moved["q", 1] - bumped["q", 1]).abs().amax((0, 1, 3))
        assert changed[2] > 1e-3 and (changed[[0, 1, 3]] == 0).all()
        # the alias names select hooks in names_filter too (a name, a list, a predicate), and the cache
        # answers to the alias and the hook's own name with the same tensor
        for names in ("blocks.1.attn.hook_q_input", ["blocks.1.attn.hook_q_input"],
                      lambda n: n == "blocks.1.attn.hook_q_input"):
            _, by_alias = model.run_with_cache(tokens, names_filter=names)
            assert list(by_alias.keys()) == ["blocks.1.hook_q_input"]
            assert by_alias["blocks.1.attn.hook_q_input"] is by_alias["blocks.1.hook_q_input"]
            # (the full cache above read the pattern, so attention ran explicitly, not SDPA: rounding differs)
            torch.testing.assert_close(by_alias["blocks.1.hook_q_input"], cache["q_input", 1], atol=1e-5, rtol=0)
        if n_kv_head == 4:
            model.set_use_split_qkv_input(False)
            model.set_use_attn_in(True)
            logits, cache = model.run_with_cache(tokens)
            torch.testing.assert_close(logits, base, atol=1e-5, rtol=0)
            assert cache["attn_in", 0].shape == (1, tokens.shape[1], 4, 64)
        else:
            with pytest.raises(ValueError, match="use_attn_in needs one key/value head per query head"):
                model.set_use_split_qkv_input(False)
                model.set_use_attn_in(True)
    finally:
        for switch in ("attn_result", "split_qkv_input", "attn_in", "hook_mlp_in", "hook_tokens"):
            getattr(model, f"set_use_{switch}")(False)
    assert not any(k.endswith(tuple(opt_in)) for k in model.run_with_cache(tokens)[1].keys())


# ---------------------------------------------------------------- 5. docs/transformerlens.md's TransformerLens demo lines


def readme_tl_blocks() -> list[str]:
    from pathlib import Path

    section = (Path(__file__).resolve().parents[1] / "docs" / "transformerlens.md").read_text().split(
        "## Using it from TransformerLens", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_runs_the_first_lines_of_tl_main_demo(checkpoint_dir, capsys):
    code = readme_tl_blocks()[0]
    assert 'load_model("runs/demo/rl/checkpoints")' in code and 'model(model_description_text, return_type="loss")' in code
    scope = {}
    exec(compile(code.replace("runs/demo/rl/checkpoints", str(checkpoint_dir)), "docs/transformerlens.md", "exec"), scope)
    out = capsys.readouterr().out
    assert out.startswith("Model loss: tensor(") and "\ncpu\n" in out and "ActivationCache with keys [" in out
    assert "torch.Size([4, 64, 64])" in out  # 4 heads; truncated to n_ctx = 64 as TL's to_tokens does
    assert len(scope["gpt2_str_tokens"]) == 64 and scope["gpt2_str_tokens"][0] == "<|bos|>"


def test_readme_circuitsvis_example_renders_our_pattern(checkpoint_dir):
    cv = pytest.importorskip("circuitsvis", reason="circuitsvis is an optional dependency")
    scope = {}
    first, second = readme_tl_blocks()[:2]
    exec(compile(first.replace("runs/demo/rl/checkpoints", str(checkpoint_dir)), "docs/transformerlens.md", "exec"), scope)
    exec(compile(second.replace("cv.attention", "html = cv.attention", 1), "docs/transformerlens.md", "exec"), scope)
    assert scope["cv"] is cv and "circuits-vis" in str(scope["html"])
