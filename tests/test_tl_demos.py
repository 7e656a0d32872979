"""TransformerLens's two tutorials, call by call, on our GPT.

Every model call of TL's `demos/Main_Demo.ipynb` and `demos/Exploratory_Analysis_Demo.ipynb` (TransformerLens
commit 4cd36aae, the notebooks as TL ships them for 4.x) is listed below with its notebook cell index (the
cell's position in the notebook's JSON `cells` list). Each runs on a small random-weight GPT (2 layers, 4
heads, a BPE vocabulary of 768 trained on the demos' own sentences) and on TransformerLens's own model of
the same weights and vocabulary: its `TransformerBridge` over our HF NanoChat export (TL 4.x has no
`HookedTransformer`; the bridge is its rotary model). A call either

- WORKS: it runs on our model and gives what TL's model gives (same tensors to float tolerance, same
  strings), with hand checks where TL itself would be the only witness; or
- FAILS: the notebook's literal arguments do not fit a 2-layer, 4-head, 768-token model (GPT-2 small has
  12 layers, 12 heads, 50257 tokens), so it raises, and raises the same exception type on TL's model; the
  reason is written next to it, and the same call with arguments scaled to this model is listed as WORKS.

Left out, each for the reason given: notebook set-up (imports, plotting helpers, `get_device`, IPython
magics), plots (`imshow`/`line`/`scatter` of results computed by calls that are listed), circuitsvis
renders (an optional dependency, not installed here; tests/test_lens.py renders one when it is), cells that
use no model (FactoredMatrix on random matrices, the `TwoLayerModel` HookedRootModule example) and cells
that download other models (gpt2/distilgpt2/SoLU checkpoints from the Hub). Loading (`boot_transformers` /
`enable_compatibility_mode`) is replaced by building the model; `enable_compatibility_mode` itself is listed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import einops  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformer_lens.utilities as utils  # noqa: E402

from aquainterp.checkpoints.huggingface import export_hf, load_transformer_bridge  # noqa: E402
from aquainterp.model.gpt import GPT, GPTConfig  # noqa: E402
from aquainterp.tokenizer import Tokenizer  # noqa: E402

NB_MAIN, NB_EXPLORE = "Main_Demo", "Exploratory_Analysis_Demo"

# The demos' own sentences (the tokenizer is trained on them, so their words are tokens, as in GPT-2's).
MODEL_DESCRIPTION_TEXT = """## Loading and Running Models

TransformerLens supports 9,000+ models across 50+ architecture families. You can load any of them in with `TransformerBridge.boot_transformers(MODEL_NAME)`. For this demo notebook we'll look at GPT-2 Small, an 80M parameter model, see the Available Models section for info on the rest.

To try the model out, let's find the loss on this text!"""
GPT2_TEXT = ("Natural language processing tasks, such as question answering, machine translation, reading "
             "comprehension, and summarization, are typically approached with supervised learning on "
             "taskspecific datasets.")
EXAMPLE_TEXT = ("The first thing you need to figure out is *how* things are tokenized. `model.to_str_tokens` splits a "
                "string into the tokens *as a list of substrings*, and so lets you explore what the text looks like. "
                "To demonstrate this, let's use it on this paragraph.")
CLEAN_PROMPT = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPTED_PROMPT = "After John and Mary went to the store, John gave a bottle of milk to"
CLAIRE = "Claire and Mary went to the shops, then Mary gave a bottle of milk to"
PROMPT_FORMAT = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
NAMES = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
RESEARCH_TEXT = ("Research in mechanistic interpretability seeks to explain behaviors of machine learning models in "
                 "terms of their internal components.")
CORPUS = [MODEL_DESCRIPTION_TEXT, GPT2_TEXT, EXAMPLE_TEXT, CLEAN_PROMPT, CORRUPTED_PROMPT, CLAIRE, RESEARCH_TEXT,
          "The quick brown fox jumped over the lazy dog", "The cat sat on the mat. The mat sat on the cat.",
          "The cat sat on the mat really hard. The cat", "Hello World", "2342+2017=21445 1000+1000000=999999",
          "(CNN) President Barack Obama caught in embarrassing new scandal\n", "Mary and Claire, then Claire and Mary."]
CORPUS += [f.format(n) + a + "." for f, pair in zip(PROMPT_FORMAT, NAMES) for n in pair for a in pair]


@dataclass
class Call:
    notebook: str
    cell: int  # index in the notebook's JSON cells list
    code: str  # the notebook's call (abridged)
    run: Callable[[Any, dict], Any]  # (model, shared state) -> a value comparable with TL's, or None
    fails: type[BaseException] | tuple | None = None  # None: works; else the exception (type) it raises on ours
    why: str = ""  # why it fails, or what was checked beyond TL agreement
    compare: Callable[[Any, Any], None] | None = field(default=None)  # ours vs TL's (default: close / equal)
    # TL's side: "bridge" runs the same call on TL's bridge; a callable (our model) -> TL's outcome; None: TL's
    # model cannot witness it (why says why) and the call's own hand checks are the witness.
    tl: Any = "bridge"
    tl_fails: type[BaseException] | tuple | None = None  # what TL raises, when not `fails`


def close(a, b, atol=1e-4):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a.cpu().float(), torch.as_tensor(b).cpu().float(), atol=atol, rtol=1e-4)
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            close(x, y, atol)
    else:
        assert a == b, (a, b)


# ---------------------------------------------------------------- the calls


def logit_diff(model, logits, correct=" John", incorrect=" Mary"):
    return logits[0, -1, model.to_single_token(correct)] - logits[0, -1, model.to_single_token(incorrect)]


def ioi(model, s):
    if "ioi" not in s:
        prompts, answer_tokens = [], []
        for fmt, names in zip(PROMPT_FORMAT, NAMES):
            for j in range(2):
                answer_tokens.append((model.to_single_token(names[j]), model.to_single_token(names[1 - j])))
                prompts.append(fmt.format(names[1 - j]))
        tokens = model.to_tokens(prompts, prepend_bos=True)
        logits, cache = model.run_with_cache(tokens)
        corrupted = [prompts[i + d] for i in range(0, len(prompts), 2) for d in (1, 0)]
        corrupted_tokens = model.to_tokens(corrupted, prepend_bos=True)
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
        s["ioi"] = dict(prompts=prompts, answers=torch.tensor(answer_tokens), tokens=tokens, logits=logits,
                        cache=cache, corrupted_tokens=corrupted_tokens, corrupted_logits=corrupted_logits,
                        corrupted_cache=corrupted_cache)
    return s["ioi"]


def ave_logit_diff(logits, answers, per_prompt=False):
    final = logits[:, -1, :].gather(-1, answers.to(logits.device))
    diff = final[:, 0] - final[:, 1]
    return diff if per_prompt else diff.mean()


def patch_sweep(model, s, act, per: str):
    """Exploratory cells 62/67/73/79/85: patch one clean activation into the corrupted run, per position or head."""
    d = ioi(model, s)
    clean, corrupt = ave_logit_diff(d["logits"], d["answers"]), ave_logit_diff(d["corrupted_logits"], d["answers"])
    out = torch.zeros(model.cfg.n_layers, d["tokens"].shape[1] if per == "pos" else model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for i in range(out.shape[1]):
            name = utils.get_act_name(act, layer, "attn") if per == "head" else utils.get_act_name(act, layer)

            def hook(x, hook, i=i):
                x = x.clone()
                clean_x = d["cache"][hook.name]
                if per == "pos":
                    x[:, i] = clean_x[:, i]
                elif act == "pattern":
                    x[:, i] = clean_x[:, i]
                else:
                    x[:, :, i] = clean_x[:, :, i]
                return x

            patched = model.run_with_hooks(d["corrupted_tokens"], fwd_hooks=[(name, hook)], return_type="logits")
            out[layer, i] = (ave_logit_diff(patched, d["answers"]) - corrupt) / (clean - corrupt)
    return out


def main_run_with_cache(model, s):  # cell 22 + 24
    tokens = model.to_tokens(GPT2_TEXT)
    logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    s["gpt2_tokens"], s["gpt2_pattern"] = tokens, cache["pattern", 0, "attn"]
    assert s["gpt2_pattern"].shape == (model.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    return logits, s["gpt2_pattern"]


def main_stop_at_layer(model, s):  # cell 27
    main_run_with_cache(model, s)
    name = "blocks.0.attn.hook_pattern"
    resid, cache = model.run_with_cache(s["gpt2_tokens"], remove_batch_dim=True, stop_at_layer=1, names_filter=[name])
    assert list(cache.keys()) == [name]
    assert torch.allclose(cache[name], s["gpt2_pattern"], atol=1e-6)
    assert resid.shape == (1, s["gpt2_tokens"].shape[1], model.cfg.d_model)  # the stream before block 1
    return resid


def main_head_ablation(model, s, head):  # cell 31
    tokens = model.to_tokens(GPT2_TEXT)

    def head_ablation_hook(value, hook):
        value[:, :, head, :] = 0.0
        return value

    original = model(tokens, return_type="loss")
    ablated = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(utils.get_act_name("v", 0), head_ablation_hook)])
    assert ablated != original
    return original, ablated


def main_ioi_logit_diff(model, s):  # cell 35
    clean_logits, s["clean_cache"] = model.run_with_cache(model.to_tokens(CLEAN_PROMPT))
    corrupted_logits = model(model.to_tokens(CORRUPTED_PROMPT))
    return logit_diff(model, clean_logits), logit_diff(model, corrupted_logits)


def main_resid_patching(model, s):  # cell 37: "blocks.{l}.hook_in" (get_act_name("in", l)) is the block's input
    clean, corrupt = main_ioi_logit_diff(model, s)
    clean_tokens, corrupted_tokens = model.to_tokens(CLEAN_PROMPT), model.to_tokens(CORRUPTED_PROMPT)

    def hook(resid_pre, hook, position):
        resid_pre[:, position, :] = s["clean_cache"][hook.name][:, position, :]
        return resid_pre

    n = clean_tokens.shape[1]
    result = torch.zeros(model.cfg.n_layers, n)
    for layer in range(model.cfg.n_layers):
        for position in range(n):
            patched = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(utils.get_act_name("in", layer),
                                                                         partial(hook, position=position))])
            result[layer, position] = (logit_diff(model, patched) - corrupt) / (clean - corrupt)
    # by construction: the prompts differ in one token; at layer 0 patching that position makes the input the
    # clean one (the clean run recovered, 1), patching any other changes nothing (0)
    differ = (clean_tokens[0] != corrupted_tokens[0]).nonzero()[:, 0].tolist()
    assert len(differ) == 1
    expected = torch.zeros(n)
    expected[differ[0]] = 1.0
    torch.testing.assert_close(result[0], expected, atol=1e-4, rtol=0)
    return result


def main_loss_fn(model, s, low, high):  # cell 44
    g = torch.Generator().manual_seed(0)
    random_tokens = torch.randint(low, high or model.cfg.d_vocab, (10, 50), generator=g).to(model.cfg.device)
    repeated = einops.repeat(random_tokens, "batch seq_len -> batch (2 seq_len)")
    logits = model(repeated)
    per_token = model.loss_fn(logits, repeated, per_token=True)
    assert per_token.shape == (10, 99)
    by_hand = -logits.log_softmax(-1)[:, :-1].gather(-1, repeated[:, 1:, None])[..., 0]
    torch.testing.assert_close(per_token, by_hand, atol=1e-5, rtol=0)
    s["repeated_tokens"] = repeated
    return einops.reduce(per_token, "batch position -> position", "mean")


def main_induction_scores(model, s):  # cell 46
    main_loss_fn(model, s, 0, None)
    store = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)

    def induction_score_hook(pattern, hook):
        stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - 50)
        store[hook.layer(), :] = einops.reduce(stripe, "batch head_index position -> head_index", "mean")

    assert model.run_with_hooks(s["repeated_tokens"], return_type=None,
                                fwd_hooks=[(lambda name: name.endswith("pattern"), induction_score_hook)]) is None
    return store


def main_pattern_hook_layer(model, s, layer):  # cell 48 (the hook displays with circuitsvis; here it keeps it)
    seen = {}
    seq = torch.randint(0, model.cfg.d_vocab, (1, 20), generator=torch.Generator().manual_seed(50))
    model.run_with_hooks(einops.repeat(seq, "batch seq_len -> batch (2 seq_len)"), return_type=None,
                         fwd_hooks=[(utils.get_act_name("pattern", layer), lambda p, hook: seen.setdefault("p", p[0, 1]))])
    return seen["p"]


def tl_params(model, s):  # cells 59 and 61
    names = {name: tuple(p.shape) for name, p in model.tl_named_parameters()}
    return {k: v for k, v in names.items() if k.startswith("blocks.0.") or not k.startswith("blocks")}


def main_hooks_on_text(model, s):  # cell 63
    seen = []
    model.run_with_hooks("The quick brown fox jumped over the lazy dog", return_type=None,
                         fwd_hooks=[(lambda n: n.startswith("blocks.0.") or not n.startswith("blocks"),
                                     lambda a, hook: seen.append((hook.name, tuple(a.shape))))])
    return len(model.to_tokens("The quick brown fox jumped over the lazy dog")[0]), seen


def unembed_bias(model, s):  # cells 67, 68, 70
    b = model.unembed.b_U
    values, indices = b.sort(descending=True)
    assert model.to_string(indices[0]) == model.to_string(torch.tensor([indices[0]]))
    return b[model.to_single_token(" John")], b[model.to_single_token(" Mary")], torch.exp(b[0] - b[1])


def main_text_logits(model, s):  # cell 81
    probs = model("The cat sat on the mat.").softmax(dim=-1)
    return probs[0, -1, model.to_single_token(" The")]


def full_ov(model, s):  # cells 110, 111, 112, 116, 117, 118
    ov = model.OV
    ev = ov.eigenvalues
    score = ev.sum(dim=-1).real / ev.abs().sum(dim=-1)
    full = model.embed.W_E @ ov @ model.unembed.W_U
    assert full.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_vocab, model.cfg.d_vocab)
    full_ev = full.eigenvalues
    assert full_ev.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return score, (full_ev.sum(-1).real / full_ev.abs().sum(-1))


def main_generate(model, s):  # cell 123 (sampled at temperature 0.7; compared with TL at temperature 0 too)
    prompt = "(CNN) President Barack Obama caught in embarrassing new scandal\n"
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=50, temperature=0.7, verbose=False)
    assert isinstance(sampled, str) and sampled.startswith(prompt)
    return model.generate(prompt, max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False)


def explore_compat(model, s, refactor):  # cell 18
    model.enable_compatibility_mode(center_unembed=True, center_writing_weights=True, fold_ln=True,
                                    refactor_factored_attn_matrices=refactor, disable_warnings=True)
    return model(model.to_tokens(CLEAN_PROMPT))


def tl_refactor_on_rotary(model):
    """TL's own weight processing, asked to refactor the QK circuit of a rotary model (our cfg says rotary)."""
    from transformer_lens.weight_processing import ProcessWeights

    assert model.cfg.positional_embedding_type == "rotary"
    ProcessWeights.refactor_factored_attn_matrices({}, model.cfg)


def explore_attn_result(model, s):  # cell 18: model.set_use_attn_result(True)
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(model.to_tokens(CLEAN_PROMPT))
    finally:
        model.set_use_attn_result(False)
    for layer in range(model.cfg.n_layers):  # TL's meaning: each head's z @ W_O, which sum to attn_out
        result = cache["result", layer]
        assert result.shape[2:] == (model.cfg.n_heads, model.cfg.d_model)
        torch.testing.assert_close(result.sum(2), cache["attn_out", layer], atol=1e-5, rtol=0)
        torch.testing.assert_close(result, torch.einsum("bphd,hdm->bphm", cache["z", layer], model.W_O[layer]),
                                   atol=1e-5, rtol=0)


def explore_pattern_patch(model, s):  # cell 85, with the hand check TL's bridge cannot give
    out = patch_sweep(model, s, "pattern", "head")
    d = ioi(model, s)
    layer, head = 1, 2
    clean = d["cache"]["pattern", layer][:, head]

    def hook(x, hook):
        x = x.clone()
        x[:, head] = clean
        return x

    with model.hooks(fwd_hooks=[(utils.get_act_name("attn", layer, "attn"), hook)]):
        _, patched = model.run_with_cache(d["corrupted_tokens"], names_filter=lambda n: n.endswith(("hook_z", "hook_v")))
    kv_head = head // (model.cfg.n_heads // model.cfg.n_key_value_heads)
    # the patched head mixes the corrupted run's values with the clean pattern
    torch.testing.assert_close(patched["z", layer][:, :, head], clean @ patched["v", layer][:, :, kv_head],
                               atol=1e-5, rtol=0)
    assert (out != 0).any()
    return out


def explore_test_prompt(model, s, capsys=None):  # cell 20
    utils.test_prompt("After John and Mary went to the store, John gave a bottle of milk to", " Mary", model,
                      prepend_bos=True, print_details=False)


def explore_logit_diffs(model, s):  # cells 22, 24, 26, 28
    d = ioi(model, s)
    assert [len(model.to_str_tokens(p)) for p in d["prompts"]] == [d["tokens"].shape[1]] * 8
    return ave_logit_diff(d["logits"], d["answers"], per_prompt=True)


def explore_directions(model, s):  # cells 34, 36: apply_ln_to_stack on the final stream, dotted with W_U columns
    d = ioi(model, s)
    W_U = model.unembed.W_U
    dirs = einops.rearrange(W_U[:, d["answers"]], "d_model batch ci -> batch ci d_model")
    s["dirs"] = dirs[:, 0] - dirs[:, 1]
    final = d["cache"]["resid_post", -1][:, -1, :]
    scaled = d["cache"].apply_ln_to_stack(final, layer=-1, pos_slice=-1)
    calculated = (scaled * s["dirs"]).sum() / len(d["prompts"])
    original = ave_logit_diff(d["logits"], d["answers"])
    # TL's own model of these weights caps its logits too (output_logits_soft_cap = 15): the calculated diff
    # is the difference of the logits before the cap, on ours and on TL's alike (see docs/transformerlens.md).
    return calculated, original


def stack_to_diff(model, s, stack, cache):
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    return einops.einsum(scaled, s["dirs"], "... batch d_model, batch d_model -> ...") / 8


def explore_accumulated(model, s):  # cell 41
    explore_directions(model, s)
    cache = ioi(model, s)["cache"]
    acc, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
    return stack_to_diff(model, s, acc, cache), labels


def explore_decompose(model, s):  # cell 44
    explore_directions(model, s)
    cache = ioi(model, s)["cache"]
    per_layer, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    return stack_to_diff(model, s, per_layer, cache), labels


def explore_heads(model, s):  # cell 47
    explore_directions(model, s)
    cache = ioi(model, s)["cache"]
    per_head, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    s["per_head"] = einops.rearrange(stack_to_diff(model, s, per_head, cache), "(layer head) -> layer head",
                                     layer=model.cfg.n_layers, head=model.cfg.n_heads)
    return s["per_head"], labels


def explore_top_heads(model, s, k):  # cells 50, 52, 99: topk of the head attributions, their patterns
    explore_heads(model, s)
    top = torch.topk(s["per_head"].flatten(), k=k).indices
    cache = ioi(model, s)["cache"]
    return torch.stack([cache["attn", int(h) // model.cfg.n_heads][0, int(h) % model.cfg.n_heads] for h in top])


def explore_corrupted(model, s):  # cells 59, 60
    d = ioi(model, s)
    return ave_logit_diff(d["corrupted_logits"], d["answers"]), model.to_string(d["corrupted_tokens"])


def explore_direct_path(model, s, out_layer, in_layer, act, use_attn_result=True):  # cells 88, 91 (93, 95)
    d = ioi(model, s)
    model.set_use_attn_result(use_attn_result)
    try:
        _, clean_cache = model.run_with_cache(d["tokens"])
        _, corrupted_cache = model.run_with_cache(d["corrupted_tokens"])
    finally:
        model.set_use_attn_result(False)
    clean, corrupt = ave_logit_diff(d["logits"], d["answers"]), ave_logit_diff(d["corrupted_logits"], d["answers"])
    H = model.cfg.n_heads
    diffs = torch.zeros(H, H)
    for A in range(H):
        for B in range(H):
            def hook(act_value, hook, A=A, B=B):
                name = utils.get_act_name("result", out_layer, "attn")
                delta = clean_cache[name][:, :, A, :] - corrupted_cache[name][:, :, A, :]
                W_B = getattr(model.blocks[in_layer].attn, f"W_{act.upper()}")[B]
                scale = corrupted_cache[utils.get_act_name("scale", in_layer, "ln1")]
                act_value = act_value.clone()
                act_value[:, :, B, :] = act_value[:, :, B, :] + delta @ W_B / scale
                return act_value

            patched = model.run_with_hooks(d["corrupted_tokens"], return_type="logits",
                                           fwd_hooks=[(utils.get_act_name(act, in_layer, "attn"), hook)])
            diffs[A, B] = (ave_logit_diff(patched, d["answers"]) - corrupt) / (clean - corrupt)
    # the hand check: what the notebook adds is head A's output change seen through head B's weights and
    # ln1's scale; the head results it reads sum to attn_out, and the sweep moved the metric
    name = utils.get_act_name("result", out_layer, "attn")
    torch.testing.assert_close(clean_cache[name].sum(2), clean_cache["attn_out", out_layer], atol=1e-5, rtol=0)
    assert diffs.abs().max() > 0
    return diffs


def explore_induction_cache(model, s, heads):  # cells 104, 105
    tokens = model.to_tokens(RESEARCH_TEXT + RESEARCH_TEXT, prepend_bos=True)
    _, cache = model.run_with_cache(tokens)
    return torch.stack([cache["attn", h // model.cfg.n_heads][0, h % model.cfg.n_heads] for h in heads])


def explore_head_scores(model, s, low, high):  # cell 108
    seq_len, scores = 100, {k: torch.zeros(model.cfg.n_layers, model.cfg.n_heads) for k in ("prev", "dup", "ind")}

    def scorer(key, offset):
        def hook(pattern, hook):
            scores[key][hook.layer()] = einops.reduce(pattern.diagonal(offset=offset, dim1=-1, dim2=-2),
                                                      "batch head_index diagonal -> head_index", "mean")
        return hook

    torch.manual_seed(0)
    tokens = torch.randint(low, high or model.cfg.d_vocab, size=(2, seq_len), device="cpu")
    repeated = einops.repeat(tokens, "batch seq_len -> batch (2 seq_len)")
    pattern_filter = lambda act_name: act_name.endswith("hook_pattern")  # noqa: E731
    loss = model.run_with_hooks(repeated, return_type="loss", fwd_hooks=[
        (pattern_filter, scorer("prev", 1)), (pattern_filter, scorer("dup", seq_len)),
        (pattern_filter, scorer("ind", seq_len - 1))])
    return loss, scores["prev"], scores["dup"], scores["ind"]


def explore_ablate_top_head(model, s):  # cells 115, 117, 119
    explore_heads(model, s)
    d = ioi(model, s)
    top = s["per_head"].flatten().argmax().item()
    layer, head = top // model.cfg.n_heads, top % model.cfg.n_heads

    def ablate(z, hook):
        z = z.clone()
        z[:, -1, head, :] = 0
        return z

    hook_z = model.blocks[layer].attn.hook_z
    hook_z.add_hook(ablate)
    try:
        ablated_logits, ablated_cache = model.run_with_cache(d["tokens"])
        # the notebook says run_with_cache removes the ablation hook; TL 4.x's HookedRootModule removes only
        # the hooks of its own context level, so the hook stays (on TL's model too): compared, then removed
        kept = bool(hook_z.fwd_hooks)
    finally:
        hook_z.remove_hooks("fwd")
    assert ave_logit_diff(ablated_logits, d["answers"]) != ave_logit_diff(d["logits"], d["answers"])
    per_head, _ = ablated_cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    ratio = (d["cache"]["ln_final.hook_scale"][:, -1] / ablated_cache["ln_final.hook_scale"][:, -1]).mean()
    return kept, ave_logit_diff(ablated_logits, d["answers"]), stack_to_diff(model, s, per_head, ablated_cache), ratio


def _labels_equal(a, b):
    close(a[0], b[0])
    assert a[1] == b[1], (a[1], b[1])


CALLS: list[Call] = [
    Call(NB_MAIN, 19, 'model(model_description_text, return_type="loss")',
         lambda m, s: m(MODEL_DESCRIPTION_TEXT, return_type="loss")),
    Call(NB_MAIN, 22, "gpt2_tokens = model.to_tokens(gpt2_text); gpt2_tokens.device",
         lambda m, s: (m.to_tokens(GPT2_TEXT), str(m.to_tokens(GPT2_TEXT).device))),
    Call(NB_MAIN, 24, 'model.run_with_cache(gpt2_tokens, remove_batch_dim=True); cache["pattern", 0, "attn"]',
         main_run_with_cache),
    Call(NB_MAIN, 24, "model.to_str_tokens(gpt2_text)", lambda m, s: m.to_str_tokens(GPT2_TEXT)),
    Call(NB_MAIN, 27, "model.run_with_cache(gpt2_tokens, remove_batch_dim=True, stop_at_layer=1, names_filter=[...])",
         main_stop_at_layer),
    Call(NB_MAIN, 31, 'run_with_hooks(..., fwd_hooks=[(get_act_name("v", 0), ablate head 8)])',
         partial(main_head_ablation, head=8), fails=IndexError,
         why="head 8 of 4: the model has 4 heads (GPT-2 small has 12)"),
    Call(NB_MAIN, 31, 'run_with_hooks(..., return_type="loss", fwd_hooks=[(get_act_name("v", 0), ablate head 1)])',
         partial(main_head_ablation, head=1)),
    Call(NB_MAIN, 35, "clean/corrupted logit difference (to_single_token, run_with_cache)", main_ioi_logit_diff),
    Call(NB_MAIN, 37, 'residual patching sweep on get_act_name("in", layer)', main_resid_patching),
    Call(NB_MAIN, 39, "model.to_str_tokens(clean_tokens)", lambda m, s: m.to_str_tokens(m.to_tokens(CLEAN_PROMPT))),
    Call(NB_MAIN, 44, "torch.randint(1000, 10000, (10, 50)) repeated; model(...); model.loss_fn(..., per_token=True)",
         partial(main_loss_fn, low=1000, high=10000), fails=IndexError,
         why="token ids up to 9999 in a vocabulary of 768 (GPT-2's is 50257): the embedding lookup is out of range"),
    Call(NB_MAIN, 44, "the same with ids drawn in [0, d_vocab); model.loss_fn(logits, tokens, per_token=True)",
         partial(main_loss_fn, low=0, high=None)),
    Call(NB_MAIN, 46, "run_with_hooks(repeated_tokens, return_type=None, fwd_hooks=[(names ending 'pattern', hook)])",
         main_induction_scores),
    Call(NB_MAIN, 48, 'run_with_hooks(..., fwd_hooks=[(get_act_name("pattern", 5), ...)])',
         partial(main_pattern_hook_layer, layer=5), fails=(KeyError, AssertionError),
         why="layer 5 of a 2-layer model: no hook of that name"),
    Call(NB_MAIN, 48, 'the same at layer 1: run_with_hooks(..., fwd_hooks=[(get_act_name("pattern", 1), ...)])',
         partial(main_pattern_hook_layer, layer=1)),
    Call(NB_MAIN, 59, "model.tl_named_parameters() (blocks.0.* and the rest)", tl_params),
    Call(NB_MAIN, 63, "model.run_with_hooks(test_prompt, return_type=None, fwd_hooks=[(filter, print shape)])",
         main_hooks_on_text,
         why="the hooks that fire and their shapes; TL's model also has hooks we do not (hook_in/out of each "
             "submodule), so only the count of tokens and our hooks' shapes are compared",
         compare=lambda a, b: (close(a[0], b[0]),
                               [close(shape, dict(b[1]).get(name, shape)) for name, shape in a[1]])),
    Call(NB_MAIN, 67, "model.unembed.b_U.sort(); model.to_string(bias_indices[i]); b_U[to_single_token(' John')]",
         unembed_bias),
    Call(NB_MAIN, 74, "model.to_str_tokens(example_text)", lambda m, s: m.to_str_tokens(EXAMPLE_TEXT)),
    Call(NB_MAIN, 77, "model.to_tokens(example_text)", lambda m, s: m.to_tokens(EXAMPLE_TEXT)),
    Call(NB_MAIN, 79, "model.to_tokens([two texts of different lengths])",
         lambda m, s: m.to_tokens(["The cat sat on the mat.", "The cat sat on the mat really hard."])[:, :9]),
    Call(NB_MAIN, 81, 'model(cat_text).softmax(-1)[0, -1, model.to_single_token(" The")]', main_text_logits),
    Call(NB_MAIN, 83, "model.to_string(256); model.to_string(example_text_tokens.squeeze())",
         lambda m, s: (m.to_string(256), m.to_string(m.to_tokens(EXAMPLE_TEXT).squeeze()))),
    Call(NB_MAIN, 85, 'model.get_token_position(" cat", text) with and without BOS',
         lambda m, s: (m.get_token_position(" cat", "The cat sat on the mat"),
                       m.get_token_position(" cat", "The cat sat on the mat", prepend_bos=False))),
    Call(NB_MAIN, 87, 'model.get_token_position(" cat", text, mode="first" | "last")',
         lambda m, s: [m.get_token_position(" cat", "The cat sat on the mat. The mat sat on the cat.", mode=mode)
                       for mode in ("first", "last")]),
    Call(NB_MAIN, 89, 'model.to_str_tokens("2342+2017=21445")',
         lambda m, s: (m.to_str_tokens("2342+2017=21445"), m.to_str_tokens("1000+1000000=999999"))),
    Call(NB_MAIN, 93, 'model("Hello World", prepend_bos=True|False).shape',
         lambda m, s: (m("Hello World").shape, m("Hello World", prepend_bos=True).shape,
                       m("Hello World", prepend_bos=False).shape)),
    Call(NB_MAIN, 95, 'model(ioi_text, prepend_bos=True|False); to_single_token(" Claire")',
         lambda m, s: [m(CLAIRE, prepend_bos=bos)[0, -1, m.to_single_token(" Claire")] for bos in (True, False)]),
    Call(NB_MAIN, 97, "model.to_str_tokens(' Claire', prepend_bos=False)",
         lambda m, s: (m.to_str_tokens(" Claire", prepend_bos=False), m.to_str_tokens("Claire", prepend_bos=False))),
    Call(NB_MAIN, 110, "model.OV; .eigenvalues; model.embed.W_E @ model.OV @ model.unembed.W_U; .eigenvalues",
         full_ov, compare=lambda a, b: close(a, b, atol=1e-3)),
    Call(NB_MAIN, 123, 'model.generate(text, max_new_tokens=50, temperature=0.7)', main_generate),
    Call(NB_EXPLORE, 18, "model.enable_compatibility_mode(center_unembed=True, center_writing_weights=True, "
                         "fold_ln=True, refactor_factored_attn_matrices=True)",
         partial(explore_compat, refactor=True), fails=ValueError, tl=tl_refactor_on_rotary, tl_fails=AssertionError,
         why="refactor_factored_attn_matrices rewrites W_Q/W_K as if the scores were x W_Q W_Kᵀ xᵀ; with rotary "
             "(and QK-norm) they are not. TL's weight processing refuses it on a rotary model (AssertionError, "
             "'You can't refactor the QK circuit when using rotary embeddings'); ours refuses with ValueError. "
             "(TL 4.3's bridge over NanoChat accepts the flag and changes nothing.)"),
    Call(NB_EXPLORE, 18, "the same without refactor_factored_attn_matrices",
         partial(explore_compat, refactor=False),
         why="weightless RMSNorm: fold_ln has nothing to fold; soft-capped logits: TL leaves center_unembed off "
             "(a constant shift of the logits changes capped logits); RMSNorm: no centering of writing weights"),
    Call(NB_EXPLORE, 18, "model.set_use_attn_result(True): blocks.{l}.attn.hook_result", explore_attn_result, tl=None,
         why="TL 4.3's bridge refuses use_attn_result on NanoChat (NotImplementedError: its AttentionBridge has no "
             "per-head result hook); checked by hand: each head's z @ W_O, summing to attn_out"),
    Call(NB_EXPLORE, 20, 'utils.test_prompt(example_prompt, " Mary", model, prepend_bos=True)', explore_test_prompt),
    Call(NB_EXPLORE, 26, "to_single_token of the names; to_str_tokens; to_tokens(prompts); run_with_cache; logit diffs",
         explore_logit_diffs),
    Call(NB_EXPLORE, 36, "apply_ln_to_stack(final residual, layer=-1, pos_slice=-1) · logit-diff directions",
         explore_directions,
         why="calculated != original on both models: the original logits are soft-capped (15·tanh(x/15)); the "
             "calculated value is exactly the pre-cap logit difference (test_tl_logit_diff_is_exact_before_the_cap)"),
    Call(NB_EXPLORE, 41, "cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)",
         explore_accumulated, compare=_labels_equal),
    Call(NB_EXPLORE, 44, "cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)", explore_decompose,
         compare=lambda a, b: (close(a[0], b[0], atol=1e-3), _labels_equal((a[0], a[1]), (a[0], b[1])))),
    Call(NB_EXPLORE, 47, "cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)", explore_heads,
         compare=_labels_equal),
    Call(NB_EXPLORE, 52, 'torch.topk(per_head_logit_diffs.flatten(), k=3); cache["attn", layer][0, head]',
         partial(explore_top_heads, k=3)),
    Call(NB_EXPLORE, 59, 'run_with_cache(corrupted_tokens, return_type="logits"); model.to_string(corrupted_tokens)',
         explore_corrupted),
    Call(NB_EXPLORE, 62, 'patch clean resid_pre into the corrupted run, per layer and position',
         lambda m, s: patch_sweep(m, s, "resid_pre", "pos")),
    Call(NB_EXPLORE, 67, "patch attn_out / mlp_out per layer and position",
         lambda m, s: (patch_sweep(m, s, "attn_out", "pos"), patch_sweep(m, s, "mlp_out", "pos"))),
    Call(NB_EXPLORE, 73, 'patch each head\'s z (get_act_name("z", layer, "attn"))',
         lambda m, s: patch_sweep(m, s, "z", "head")),
    Call(NB_EXPLORE, 79, 'patch each head\'s v (get_act_name("v", layer, "attn"))',
         lambda m, s: patch_sweep(m, s, "v", "head")),
    Call(NB_EXPLORE, 85, 'patch each head\'s pattern (get_act_name("attn", layer, "attn"))', explore_pattern_patch,
         tl=None, why="TL 4.3's bridge over NanoChat ignores writes to hook_pattern (its attention runs HF's kernel: "
                      "zeroing every pattern leaves its logits unchanged); checked by hand: the patched head's z is "
                      "the clean pattern times the corrupted run's values"),
    Call(NB_EXPLORE, 91, "direct path patching, output layer 5 to value layer 8 (hook_result, ln1.hook_scale)",
         partial(explore_direct_path, out_layer=5, in_layer=8, act="v", use_attn_result=False), fails=KeyError,
         why="layers 5 and 8 of a 2-layer model: the cache has no blocks.5.attn.hook_result"),
    Call(NB_EXPLORE, 91, "the same from layer 0's head outputs to layer 1's values, queries and keys",
         lambda m, s: [explore_direct_path(m, s, 0, 1, act) for act in ("v", "q", "k")], tl=None,
         why="TL 4.3's bridge refuses use_attn_result on NanoChat (NotImplementedError), so it cannot run this "
             "cell; checked by hand: the head results it reads sum to attn_out and the patches move the metric"),
    Call(NB_EXPLORE, 99, "torch.topk(patched_head_z_diff.abs().flatten(), k=10)",
         partial(explore_top_heads, k=10), fails=RuntimeError,
         why="10 heads asked of 8 (2 layers × 4 heads; GPT-2 small has 144)"),
    Call(NB_EXPLORE, 104, 'model.to_tokens(example_text * 2, prepend_bos=True); run_with_cache; cache["attn", 81 // n_heads]',
         partial(explore_induction_cache, heads=[81, 65]), fails=KeyError,
         why="heads 81 and 65 are GPT-2 small's L6H9 and L5H5: layer 20 and 16 of a 2-layer model"),
    Call(NB_EXPLORE, 105, "the same for heads 5 and 6 (layer 1)", partial(explore_induction_cache, heads=[5, 6])),
    Call(NB_EXPLORE, 108, "torch.randint(100, 20000, (2, 100)) repeated; run_with_hooks(return_type='loss', 3 pattern hooks)",
         partial(explore_head_scores, low=100, high=20000), fails=IndexError,
         why="token ids up to 19999 in a vocabulary of 768: the embedding lookup is out of range"),
    Call(NB_EXPLORE, 108, "the same with ids in [100, d_vocab)", partial(explore_head_scores, low=100, high=None)),
    Call(NB_EXPLORE, 115, "hook_z.add_hook(ablate); run_with_cache(tokens); stack_head_results; ln_final.hook_scale",
         explore_ablate_top_head),
]


# ---------------------------------------------------------------- fixtures and the test


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our GPT, TransformerLens's bridge over its HF export): same weights, same tokenizer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        tok = Tokenizer.train_from_iterator(CORPUS * 3, vocab_size=768)
    assert tok.vocab_size == 768
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.wte.weight else p.shape[-1] ** -0.5)
    model.set_tokenizer(tok)
    model.eval()
    bridge = load_transformer_bridge(export_hf(model, tok, tmp_path_factory.mktemp("hf") / "hf"))
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return model, bridge


def _call_id(call: Call) -> str:
    return f"{call.notebook}-cell{call.cell}-{'fails' if call.fails else 'works'}-{CALLS.index(call)}"


@pytest.mark.parametrize("call", CALLS, ids=_call_id)
def test_tl_demo_call(pair, call):
    model, bridge = pair
    tl = (lambda: call.run(bridge, {})) if call.tl == "bridge" else (lambda: call.tl(model)) if call.tl else None
    with torch.no_grad():
        if call.fails is not None:
            with pytest.raises(call.fails):
                call.run(model, {})
            with pytest.raises(call.tl_fails or call.fails):
                tl()
            return
        ours = call.run(model, {})
        if tl is not None:
            (call.compare or close)(ours, tl())
    assert not model.cfg.use_attn_result and not any(h.fwd_hooks for h in model.hook_dict.values())


def test_tl_demo_calls_are_the_notebooks_and_each_says_why_where_needed():
    """The list's shape: both notebooks, cells in notebook order, a reason for every failing call and for
    every call TL's model cannot witness."""
    for notebook in (NB_MAIN, NB_EXPLORE):
        cells = [c.cell for c in CALLS if c.notebook == notebook]
        assert cells == sorted(cells) and len(cells) >= 20
    for call in CALLS:
        if call.fails is not None or call.tl is None:
            assert len(call.why) > 20, call.code
