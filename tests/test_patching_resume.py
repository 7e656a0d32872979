"""The resumed patched forward (start at the patch's layer and position from the base run's cache) equals
a full patched forward: cell by cell against a hand-written hook on the whole model, and sweep by sweep
against the reference path (reuse_prefix=False), for both directions, a noise corruption, GQA and
right-padded pairs of different lengths."""

import pytest
import torch
from test_patching import LETTER_IDS, make_pairs, noise_pairs, random_gpt

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.patching.pairs import PatchPair
from aquainterp.patching.patcher import SWEEPS, Patcher


@pytest.fixture(scope="module")
def model():
    return random_gpt(n_layer=3)


def scrambled_pairs(n=3, length=12, seed=2):
    """Clean and corrupted prompts that differ at every position, so that every patch does something."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (2, n, length), generator=g).tolist()
    return [PatchPair(f"s{i}", tuple(ids[0][i]), tuple(ids[1][i]), LETTER_IDS[i], LETTER_IDS[i + 1], LETTER_IDS)
            for i in range(n)]


def full_patched_logits(patcher, run, hook_name, source, pos):
    """Reference: the whole model on `run`'s tokens, one hook writing source[:, pos] (None: all positions);
    the letter logits at the decision position."""
    everyone = torch.arange(len(patcher.pairs))

    def write(act, hook):
        act = act.clone()
        if pos is None:
            act[:] = source
        else:
            act[:, pos] = source[:, pos]
        return act

    hooks = (patcher.corruption_hooks(everyone) if run == "corrupted" else []) + [(hook_name, write)]
    logits = patcher.model.run_with_hooks(patcher.tokens[run], fwd_hooks=hooks)
    return logits[everyone, patcher.decision_pos][:, patcher.head_ids]


@pytest.mark.parametrize("pairs", ["scrambled", "noise"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("hook", ["hook_resid_pre", "hook_attn_out", "attn.hook_z", "hook_resid_post"])
def test_resumed_forward_equals_full_patched_forward(model, pairs, direction, hook):
    pairs = scrambled_pairs() if pairs == "permute" else noise_pairs(n=3, length=12)
    patcher = Patcher(model, pairs, batch_size=4, progress=False)
    base, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    last_layer, last_pos = model.cfg.n_layers - 1, patcher.n_pos - 1
    everyone, changed = torch.arange(len(pairs)), []
    for layer, pos in [(0, 0), (0, last_pos), (last_layer, 0), (last_layer, last_pos), (1, 5), (2, 3)]:
        name = f"blocks.{layer}.{hook}"
        source = patcher.activations(other, "blocks.{}." + hook)[layer]
        expect = full_patched_logits(patcher, base, name, source, pos)
        hooks = [(name, patcher._patch_hook(source, everyone, everyone, torch.full((3,), pos),
                                            torch.full((3,), -1), start=pos))]
        got = patcher._resumed_logits(base, everyone, hooks, layer, pos)
        torch.testing.assert_close(got, expect, atol=2e-5, rtol=0)
        unpatched = patcher._resumed_logits(base, everyone, [], layer, pos)
        changed.append(bool((got - unpatched).abs().max() > 1e-3))
    assert sum(changed) >= 3, changed  # the equalities above are not between unpatched runs


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("name", list(SWEEPS))
def test_resumed_sweeps_equal_reference_path(model, name, direction):
    pairs = make_pairs(n=3, length=12)
    fast = Patcher(model, pairs, batch_size=7, progress=False).sweep(name, direction)
    slow = Patcher(model, pairs, batch_size=7, progress=False, reuse_prefix=False).sweep(name, direction)
    assert slow.normalized.abs().max() > 0.05
    torch.testing.assert_close(fast.logit_diff, slow.logit_diff, atol=2e-5, rtol=0)


@pytest.mark.parametrize("align", ["start", "end"])
def test_resumed_sweeps_on_noise_gqa_and_padded_pairs(align):
    torch.manual_seed(4)
    gqa = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_(0.0, 0.3)
    gqa.eval()
    padded = make_pairs(n=3, lengths=[9, 12, 10])
    for pairs in (padded, noise_pairs(n=3, length=10)):
        for name in ("resid_pre", "z", "z_pos", "mlp_out"):
            for direction in ("denoise", "noise"):
                fast = Patcher(gqa, pairs, batch_size=5, align=align, progress=False).sweep(name, direction)
                slow = Patcher(gqa, pairs, batch_size=5, align=align, progress=False,
                               reuse_prefix=False).sweep(name, direction)
                torch.testing.assert_close(fast.logit_diff, slow.logit_diff, atol=2e-5, rtol=0)


def test_last_layer_patches_off_the_decision_position_keep_the_base_value(model):
    """They are not run at all with prefix reuse; the reference path runs them and gets the same."""
    patcher = Patcher(model, make_pairs(), batch_size=8, progress=False)
    reference = Patcher(model, make_pairs(), batch_size=8, progress=False, reuse_prefix=False)
    for name in ("resid_post", "attn_out", "z_pos"):
        fast, slow = patcher.sweep(name).logit_diff[-1, :-1], reference.sweep(name).logit_diff[-1, :-1]
        assert (fast == patcher.corrupted_ld).all()
        torch.testing.assert_close(slow, fast, atol=2e-5, rtol=0)


class CountingPatcher(Patcher):
    """Records the (layer, rows) of every resumed forward."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        super().__init__(*args, **kwargs)

    def _resumed_logits(self, run, pair_index, patch_hooks, layer, start, stop=None):
        self.calls.append((layer, len(pair_index)))
        return super()._resumed_logits(run, pair_index, patch_hooks, layer, start, stop)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_identical_activations_are_not_patched_and_results_do_not_change(model, direction):
    """Patches whose source equals the base activation are no-ops: skipped, and the sweep is the same.
    make_pairs changes tokens 1 and 6 of 12: at layer 0 only those two positions differ, and position 0
    never differs (causal)."""
    pairs = make_pairs(n=3, length=12)
    for name in ("resid_pre", "z_pos", "z", "mlp_out"):
        fast = CountingPatcher(model, pairs, batch_size=7, progress=False)
        slow = CountingPatcher(model, pairs, batch_size=7, progress=False, skip_identical=False)
        a, b = fast.sweep(name, direction), slow.sweep(name, direction)
        torch.testing.assert_close(a.logit_diff, b.logit_diff, atol=1e-5, rtol=0)
        rows = lambda p, layer: sum(n for la, n in p.calls if la == layer)
        if name == "resid_pre":
            assert rows(fast, 0) == 2 * len(pairs) and rows(slow, 0) == 12 * len(pairs)
            skipped = a.logit_diff[:, 0]
            base = fast.corrupted_ld if direction == "denoise" else fast.clean_ld
            # exact by construction: a skipped identical patch copies the unpatched value, no arithmetic
            assert torch.equal(skipped, base.expand_as(skipped))  # exactly the unpatched value
        if name != "z":
            assert rows(fast, 1) < rows(slow, 1)  # position 0 is the same in both runs at every layer
