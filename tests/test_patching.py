"""Activation patching engine: equal to transformer_lens.patching on our GPT, exact sanity anchors,
batching/padding invariance, and clear errors.

The model is a small random GPT with every weight non-zero (nanochat's init zeroes lm_head, which would
make every logit difference 0). Pairs are hand-made token ids: the engine only needs ids and letters.
"""

from functools import partial

import pytest
import torch
import transformer_lens.patching as tlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.patching.pairs import PatchPair
from aquainterp.patching.patcher import SWEEPS, Patcher

LETTER_IDS = (40, 41, 42, 43, 44)


def random_gpt(n_layer=2, n_head=2, n_embd=64, vocab=50, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                          n_kv_head=n_head, n_embd=n_embd))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def make_pairs(n=3, length=12, seed=1, lengths=None):
    """Clean ids, corrupted = two tokens changed, gold letter i, corrupted gold letter i+1."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        t = lengths[i] if lengths else length
        ids = torch.randint(0, 40, (t,), generator=g).tolist()
        bad = list(ids)
        bad[1] = (bad[1] + 7) % 40
        bad[t // 2] = (bad[t // 2] + 3) % 40
        pairs.append(PatchPair(f"p{i}", tuple(ids), tuple(bad), LETTER_IDS[i % 5], LETTER_IDS[(i + 1) % 5], LETTER_IDS))
    return pairs


def noise_pairs(n=3, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = tuple(torch.randint(0, 40, (length,), generator=g).tolist())
        out.append(PatchPair(f"n{i}", ids, ids, LETTER_IDS[i % 5], None, LETTER_IDS, noise_span=(2, 6)))
    return out



@pytest.fixture(scope="module")
def model():
    return random_gpt()


TL_FUNCTIONS = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "resid_mid": tlp.get_act_patch_resid_mid,
    "resid_post": partial(tlp.generic_activation_patch, patch_setter=tlp.layer_pos_patch_setter,
                          activation_name="resid_post", index_axis_names=("layer", "pos")),
    "attn_out": tlp.get_act_patch_attn_out,
    "mlp_out": tlp.get_act_patch_mlp_out,
    "z": tlp.get_act_patch_attn_head_out_all_pos,
    "z_pos": tlp.get_act_patch_attn_head_out_by_pos,
}


def transformer_lens_sweep(model, patcher, name, direction):
    """TransformerLens's own function on the same model, pairs and metric (one forward per cell)."""
    base, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    everyone = torch.arange(len(patcher.pairs))
    with model.hooks(fwd_hooks=patcher.corruption_hooks(everyone) if other == "corrupted" else []):
        _, source_cache = model.run_with_cache(patcher.tokens[other])
    with model.hooks(fwd_hooks=patcher.corruption_hooks(everyone) if base == "corrupted" else []):
        return TL_FUNCTIONS[name](model, patcher.tokens[base], source_cache, patcher.metric)


def test_tl_table_covers_every_sweep():
    assert set(TL_FUNCTIONS) == set(SWEEPS)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", list(SWEEPS))
def test_equals_transformer_lens(model, name, direction):
    patcher = Patcher(model, make_pairs(), batch_size=13, progress=False)
    ours = patcher.sweep(name, direction)
    ref = transformer_lens_sweep(model, patcher, name, direction)
    assert ours.normalized.shape == ref.shape
    assert ref.abs().max() > 0.05  # the comparison is not between two near-zero maps
    torch.testing.assert_close(ours.normalized, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["resid_pre", "z_pos"])
def test_noise_corruption_equals_transformer_lens(model, name):
    patcher = Patcher(model, noise_pairs(), batch_size=16, progress=False)
    for direction in ("denoise", "noise"):
        ours = patcher.sweep(name, direction)
        ref = transformer_lens_sweep(model, patcher, name, direction)
        torch.testing.assert_close(ours.normalized, ref, atol=1e-5, rtol=0)


def test_metric_anchors_are_exact(model):
    """Patching the whole final residual stream at the decision position restores exactly 1; a patch that
    cannot reach the decision position (later layers' earlier positions feed nothing) reads exactly 0."""
    pairs = make_pairs()
    patcher = Patcher(model, pairs, batch_size=8, progress=False)
    last = model.cfg.n_layers - 1
    denoise = patcher.sweep("resid_post", "denoise").normalized
    assert denoise[last, -1].item() == 1.0
    assert (denoise[last, :-1] == 0).all()
    noise = patcher.sweep("resid_post", "noise").normalized
    assert noise[last, -1].item() == 0.0
    assert (noise[last, :-1] == 1).all()
    # resid_pre of layer 0 at the positions where the prompts differ carries everything there is.
    assert patcher.metric(model(patcher.tokens["clean"])).item() == pytest.approx(1.0, abs=1e-6)
    assert patcher.metric(model(patcher.tokens["corrupted"])).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_diff_per_pair_and_normalisation(model):
    patcher = Patcher(model, make_pairs(), batch_size=8, progress=False)
    r = patcher.sweep("attn_out", "denoise")
    assert r.logit_diff.shape == (*r.normalized.shape, 3)
    expect = (r.logit_diff.mean(-1) - patcher.corrupted_ld.mean()) / (patcher.clean_ld.mean() - patcher.corrupted_ld.mean())
    torch.testing.assert_close(r.normalized, expect, atol=1e-6, rtol=1e-6)
    # hand check of one pair's baseline against the full forward
    logits = model(patcher.tokens["clean"])[0, -1]
    p = patcher.pairs[0]
    assert patcher.clean_ld[0].item() == pytest.approx((logits[p.clean_letter_id] - logits[p.corrupted_letter_id]).item(), abs=1e-4)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 40), name=st.sampled_from(["resid_mid", "z", "z_pos"]))
def test_batch_size_does_not_change_results(model, batch_size, name):
    pairs = make_pairs()
    one = Patcher(model, pairs, batch_size=3, progress=False).sweep(name)
    other = Patcher(model, pairs, batch_size=batch_size, progress=False).sweep(name)
    torch.testing.assert_close(other.logit_diff, one.logit_diff, atol=2e-5, rtol=0)


@pytest.mark.parametrize("align", ["start", "end"])
def test_pairs_of_different_lengths_equal_each_pair_alone(model, align):
    """Right padding is invisible to a causal model; align='end' lines positions up at the decision."""
    pairs = make_pairs(n=3, lengths=[9, 12, 10])
    patcher = Patcher(model, pairs, batch_size=16, align=align, progress=False)
    together = patcher.sweep("resid_pre")
    assert together.normalized.shape == (model.cfg.n_layers, 12)
    for i, pair in enumerate(pairs):
        alone = Patcher(model, [pair], batch_size=16, align=align, progress=False).sweep("resid_pre")
        t = len(pair.clean_ids)
        cols = slice(12 - t, 12) if align == "end" else slice(0, t)
        torch.testing.assert_close(together.logit_diff[:, cols, i], alone.logit_diff[:, :, 0], atol=2e-5, rtol=0)
        outside = together.logit_diff[:, 0: 12 - t, i] if align == "end" else together.logit_diff[:, t:, i]
        assert (outside == patcher.corrupted_ld[i]).all()  # padding cells: the unpatched value


def test_position_labels_are_unique_and_marked(model):
    pairs = make_pairs(n=2, lengths=[9, 12])
    labels = Patcher(model, pairs, batch_size=8, align="end", progress=False).position_labels()
    assert len(labels) == len(set(labels)) == 12
    assert labels[-1].startswith("0: ") and labels[0].startswith("-11: ")
    assert labels[0].endswith(str(pairs[1].clean_ids[0]))  # only the longer pair reaches that far back
    assert labels[-1].endswith("*") or pairs[0].clean_ids[-1] == pairs[1].clean_ids[-1]


def test_errors_name_the_pair_and_the_problem(model):
    with pytest.raises(ValueError, match=r"pair q7: clean prompt has 3 tokens, corrupted has 2"):
        PatchPair("q7", (1, 2, 3), (1, 2), 40, 41, LETTER_IDS)
    with pytest.raises(ValueError, match="pair q8: the corrupted gold letter equals the clean one"):
        PatchPair("q8", (1, 2, 3), (1, 2, 4), 40, 40, LETTER_IDS)
    with pytest.raises(ValueError, match=r"pair q9: noise span \(2, 9\) is not inside"):
        PatchPair("q9", (1, 2, 3), (1, 2, 3), 40, None, LETTER_IDS, noise_span=(2, 9))
    same = [PatchPair("s", (1, 2, 3), (1, 2, 3), 40, 41, LETTER_IDS)]
    with pytest.raises(ValueError, match="same mean letter logit difference"):
        Patcher(model, same, progress=False)
    patcher = Patcher(model, make_pairs(), progress=False)
    with pytest.raises(ValueError, match="unknown sweep 'resid'"):
        patcher.sweep("resid")
    with pytest.raises(ValueError, match="direction must be one of"):
        patcher.sweep("z", "sideways")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Patcher(model, make_pairs(), batch_size=0)
    with pytest.raises(ValueError, match="no pairs"):
        Patcher(model, [])


def test_gqa_model_z_sweep_matches_transformer_lens():
    torch.manual_seed(3)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=1, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    patcher = Patcher(model, make_pairs(), batch_size=10, progress=False)
    for name in ("z", "z_pos"):
        torch.testing.assert_close(patcher.sweep(name).normalized,
                                   transformer_lens_sweep(model, patcher, name, "denoise"), atol=1e-5, rtol=0)
