"""The decision at the answer step of a completion: where it is cut, and exact probe values there.

Hand-set ground truth on rows that are prompt + completion + answer marker, with completions of
different lengths in one right-padded batch: the decision position is the marker's last token, the
option spans are in the prompt, the completion mass covers the completion's own tokens up to the
decision. The suite-level behaviour on a trained model (its own greedy completions) is in
tests/test_probes_trained.py.
"""

import math

import pytest
import torch
from test_probes_model import LETTER_IDS, SPANS, set_pattern, tiny_model, uniform_causal

from aquainterp.tasks import answer_step
from probes.decision import read_decisions, reference_letters
from probes.kl import kl_from_logits
from probes.logit_lens import gold_margins, lens_letter_logits
from probes.probe_set import completion_row
from probes.reference import freeze_reference

MARKER = [45, 46]  # stands for "Answer", ":"


def rows(n=4, seed=0):
    """Prompts of different lengths (spans inside), completions of 0..n-1 + 3 tokens, then the marker and
    a letter; one completion mentions the marker early (the LAST marker is the answer step)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 40, (20 + 3 * i,), generator=gen).tolist()
        completion = torch.randint(0, 40, (3 + i,), generator=gen).tolist()
        if i == 1:
            completion = MARKER + [42] + completion
        row = completion_row(prompt, completion + MARKER + [LETTER_IDS[i % 5], 47], MARKER, LETTER_IDS, i % 5, SPANS)
        assert row is not None and row.ids[-2:] == tuple(MARKER)
        out.append(row)
    return out


def test_answer_step_is_the_end_of_the_last_marker():
    assert answer_step([1, 2, 45, 46, 40, 9], MARKER) == 4
    assert answer_step([45, 46, 41, 3, 45, 46, 40], MARKER) == 6
    assert answer_step([45, 46], MARKER) == 2  # marker at the very end: the letter was cut off by the budget
    assert answer_step([1, 45, 2, 46], MARKER) is None and answer_step([], MARKER) is None
    with pytest.raises(ValueError, match="no tokens"):
        answer_step([1, 2], [])
    assert completion_row([1, 2, 3], [7, 8], MARKER, LETTER_IDS, 0) is None


def test_row_is_prompt_plus_completion_up_to_the_marker():
    prompt, completion = [5] * 20, [6, 7, 45, 46, 41, 8, 45, 46, 43, 3]
    row = completion_row(prompt, completion, MARKER, LETTER_IDS, 3, SPANS)
    assert row.ids == tuple(prompt + completion[:8]) and row.completion_start == 20 and row.gold == 3


def test_uniform_attention_gives_exact_entropy_option_and_completion_mass():
    model = tiny_model()
    batch = rows()
    with torch.no_grad(), model.hooks(fwd_hooks=[set_pattern(uniform_causal)]):
        got = read_decisions(model, batch, ("entropy", "option_mass"), batch_size=4, pad_id=0, device="cpu",
                             entropy_window=3)
    for b, row in enumerate(batch):
        n = len(row.ids)  # the decision position sees every token of its row
        want_ent = torch.tensor([math.log(n - k) for k in (2, 1, 0)], dtype=torch.float64)
        assert torch.allclose(got["entropy"][b], want_ent.expand(2, 2, 3), atol=1e-9)
        spans = torch.tensor([(e - s) / n for s, e in SPANS], dtype=torch.float64)
        assert torch.allclose(got["option_mass"][b], spans.expand(2, 2, 5), atol=1e-9)
        comp = (n - row.completion_start) / n  # completion tokens and the marker, decision included
        assert torch.allclose(got["completion_mass"][b], torch.full((2, 2), comp, dtype=torch.float64), atol=1e-9)
    assert len({len(r.ids) for r in batch}) == len(batch)  # different lengths really shared one batch


def test_hand_set_head_gives_known_margins_and_kl_at_the_answer_step():
    model = tiny_model()
    d = model.config.n_embd
    direction = torch.zeros(d)
    direction[0] = math.sqrt(d)
    wanted = torch.tensor([1.0, 4.0, -2.0, 3.0, 0.5])
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[list(LETTER_IDS), 0] = wanted / math.sqrt(d)
    reference = freeze_reference(model)
    shifted = torch.tensor([0.0, 1.0, 2.0, 0.0, -1.0])
    with torch.no_grad():
        reference.lm_head.weight[list(LETTER_IDS), 0] += shifted / math.sqrt(d)
    fix = ("ln_final.hook_normalized", lambda x, hook: direction.expand_as(x).clone())
    batch = rows(5)
    with torch.no_grad(), model.hooks(fwd_hooks=[fix]), reference.hooks(fwd_hooks=[fix]):
        got = read_decisions(model, batch, (), batch_size=2, pad_id=0, device="cpu")
        ref = reference_letters(reference, batch, batch_size=3, pad_id=0, hooked=False)
    capped = 15 * torch.tanh(wanted / 15)
    ref_capped = 15 * torch.tanh((wanted + shifted) / 15)
    assert torch.allclose(got["letters"], capped.expand(5, 5), atol=1e-5)
    assert torch.allclose(ref, ref_capped.expand(5, 5), atol=1e-5)
    p, q = torch.softmax(capped.double(), 0), torch.softmax(ref_capped.double(), 0)
    want_kl = float((p * (p / q).log()).sum())
    assert kl_from_logits(got["letters"], ref).tolist() == pytest.approx([want_kl] * 5, rel=1e-4)
    assert got["gold"].tolist() == [0, 1, 2, 3, 4]
    want_gold = [float(capped[g] - capped[[j for j in range(5) if j != g]].max()) for g in range(5)]
    assert gold_margins(got["letters"], got["gold"]).tolist() == pytest.approx(want_gold, abs=1e-5)


def test_logit_lens_reads_each_layers_residual_through_the_head():
    model = tiny_model(layers=3)
    d = model.config.n_embd
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[list(LETTER_IDS), :5] = torch.eye(5)  # letter o reads channel o
    # layer l's residual is fixed to a vector with RMS 1 pointing at channel l (so norm() leaves it)
    vectors = [torch.zeros(d) for _ in range(3)]
    for layer, v in enumerate(vectors):
        v[layer] = math.sqrt(d)
    hooks = [(f"blocks.{layer}.hook_resid_post", lambda x, hook, v=v: v.expand_as(x).clone())
             for layer, v in enumerate(vectors)]
    batch = rows(3)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        got = read_decisions(model, batch, (), batch_size=3, pad_id=0, device="cpu", lens=True)
    lens = got["lens_letters"]  # [N, L, 5]
    want = torch.zeros(3, 5)
    for layer in range(3):
        want[layer, layer] = 15 * math.tanh(math.sqrt(d) / 15)
    assert torch.allclose(lens, want.expand(3, 3, 5), atol=1e-4)
    assert torch.allclose(lens[:, -1], got["letters"], atol=1e-5)  # the last layer's lens is the output


def test_logit_lens_last_layer_equals_the_letter_logits_of_a_real_forward():
    model = tiny_model(seed=5)
    batch = rows(4, seed=2)
    with torch.no_grad():
        got = read_decisions(model, batch, ("entropy",), batch_size=4, pad_id=0, device="cpu", lens=True)
        for b, row in enumerate(batch):
            alone = model(torch.tensor([row.ids]))[0, -1, list(LETTER_IDS)]
            assert torch.allclose(got["letters"][b], alone, atol=1e-5)
            assert torch.allclose(got["lens_letters"][b, -1], alone, atol=1e-5)
    resid = torch.randn(2, 2, model.config.n_embd)
    with pytest.raises(ValueError, match="letter_ids"):
        lens_letter_logits(model, resid, torch.zeros(2, 4, dtype=torch.long))
