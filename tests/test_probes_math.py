"""Probe math on plain tensors: known answers, closed forms, brute-force references, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.counts import letter_counts
from probes.entropy import normalized_entropy, pattern_entropy, query_window, window_entropy
from probes.kl import kl_from_logits, kl_metrics, sequence_kl
from probes.margin import letter_margins, margin_metrics
from probes.option_mass import decision_rows, option_mass, option_mass_metrics, span_mask


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000])
def test_uniform_row_entropy_is_log_n_and_one_hot_is_zero(n):
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert abs(pattern_entropy(uniform).item() - math.log(n)) < 1e-12
    # a float32 pattern (what the model produces) is exact up to float32's rounding of 1/n
    assert abs(pattern_entropy(uniform.float()).item() - math.log(n)) < 1e-6 * max(1.0, math.log(n))
    one_hot = torch.zeros(n)
    one_hot[n // 2] = 1.0
    assert pattern_entropy(one_hot).item() == 0.0
    assert abs(normalized_entropy(pattern_entropy(uniform), n).item() - (1.0 if n > 1 else 0.0)) < 1e-12


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.floats(0.1, 30.0), st.integers(0, 2**31 - 1))
def test_normalized_entropy_of_causal_softmax_rows_is_in_unit_interval(t, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, t, t, generator=gen) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    lengths = torch.tensor([t, max(1, t - 2)])
    pos, valid = query_window(lengths, window=4)
    ent, norm = window_entropy(pattern, pos, valid)
    ok = ~norm.isnan()
    assert ok.any()
    assert (norm[ok] >= 0).all() and (norm[ok] <= 1 + 1e-12).all()
    assert (ent[ok] >= 0).all() and (ent[ok] <= torch.log((pos + 1).double())[:, None, :].expand_as(ent)[ok] + 1e-9).all()


def test_query_window_ends_at_decision_position_and_marks_short_rows():
    pos, valid = query_window(torch.tensor([10, 2]), window=3)
    assert pos.tolist() == [[7, 8, 9], [0, 0, 1]]
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    with pytest.raises(ValueError, match="window must be >= 1"):
        query_window(torch.tensor([3]), 0)


def test_normalized_entropy_rejects_zero_visible_keys():
    with pytest.raises(ValueError, match="n_visible must be >= 1"):
        normalized_entropy(torch.zeros(2), torch.tensor([0, 3]))


def test_option_mass_sums_rows_over_spans():
    spans = [[(1, 3), (3, 4), (4, 6), (6, 7), (7, 9)]]
    mask = span_mask(spans, 10)
    row = torch.tensor([0.1, 0.2, 0.0, 0.1, 0.05, 0.05, 0.3, 0.0, 0.1, 0.1], dtype=torch.float64)
    mass = option_mass(row.view(1, 1, 10), mask)
    assert torch.allclose(mass[0, 0], torch.tensor([0.2, 0.1, 0.1, 0.3, 0.1], dtype=torch.float64))
    assert abs(mass.sum().item() - 0.8) < 1e-12  # 0.1 (pos 0) + 0.1 (pos 9) fall outside the options


def test_span_mask_errors_name_row_and_option():
    with pytest.raises(ValueError, match="row 0 option C span \\(5, 5\\)"):
        span_mask([[(0, 1), (1, 2), (5, 5), (6, 7), (7, 8)]], 10)
    with pytest.raises(ValueError, match="row 1 has 4 spans"):
        span_mask([[(0, 1)] * 5, [(0, 1)] * 4], 10)


def test_option_mass_metrics_pick_gold_and_chosen():
    mass = torch.zeros(2, 1, 2, 5, dtype=torch.float64)
    mass[0, 0, :, 2] = 0.6  # problem 0: all heads put 0.6 on C
    mass[1, 0, :, 0] = 0.2  # problem 1: 0.2 on A
    mass[1, 0, :, 4] = 0.4  # and 0.4 on E
    m = option_mass_metrics(mass, gold=torch.tensor([2, 4]), chosen=torch.tensor([1, 0]))
    assert m["attn/option_mass_mean"] == pytest.approx(0.6)
    assert m["attn/option_mass/layer0/head1"] == pytest.approx(0.6)
    assert m["attn/gold_option_mass_mean"] == pytest.approx((0.6 + 0.4) / 2)
    assert m["attn/chosen_option_mass_mean"] == pytest.approx((0.0 + 0.2) / 2)


def test_decision_rows_take_last_real_token():
    pattern = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    rows = decision_rows(pattern, torch.tensor([4, 2]))
    assert rows[0, 0].tolist() == pattern[0, 0, 3].tolist()
    assert rows[1, 0].tolist() == pattern[1, 0, 1].tolist()


def test_letter_margins_known_values():
    letters = torch.tensor([[1.0, 5.0, 2.0, 4.5, -1.0],   # top B by 0.5; gold D -> 4.5 - 5 = -0.5
                            [3.0, 0.0, 0.0, 0.0, 0.0],    # top A by 3; gold A -> +3
                            [2.0, 2.0, 0.0, 0.0, 1.0]])   # tie: margin 0; gold E -> 1 - 2 = -1
    margin, gold_margin, pred = letter_margins(letters, torch.tensor([3, 0, 4]))
    assert margin.tolist() == [0.5, 3.0, 0.0]
    assert gold_margin.tolist() == [-0.5, 3.0, -1.0]
    assert pred.tolist() == [1, 0, 0]
    m = margin_metrics(margin, gold_margin)
    assert m["rl/letter_margin_mean"] == pytest.approx(3.5 / 3)
    assert m["rl/letter_margin_std"] == pytest.approx(torch.tensor([0.5, 3.0, 0.0]).std(unbiased=False).item())
    with pytest.raises(ValueError, match="expected \\[N, 5\\]"):
        letter_margins(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))


def test_kl_identical_is_exactly_zero_and_shift_invariant():
    logits = torch.randn(4, 7, 50, generator=torch.Generator().manual_seed(0)) * 5
    assert (kl_from_logits(logits, logits.clone()) == 0).all()
    assert kl_from_logits(logits, logits + 3.0).abs().max() < 1e-5


def test_kl_closed_form():
    # KL([.5,.5] || [.9,.1]) = .5 ln(.5/.9) + .5 ln(.5/.1) = ln(5/3)
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.9, 0.1]).log()
    assert kl_from_logits(p, q).item() == pytest.approx(math.log(5 / 3), rel=1e-6)
    # two logits differing by a constant offset d on one of k classes: p uniform, q softmax([d,0,..])
    k, d = 5, 2.0
    zq = math.exp(d) + k - 1
    expected = sum((1 / k) * math.log((1 / k) / (w / zq)) for w in [math.exp(d)] + [1.0] * (k - 1))
    q = torch.tensor([d] + [0.0] * (k - 1))
    assert kl_from_logits(torch.zeros(k), q).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_from_logits(torch.zeros(3), torch.zeros(4))


def test_sequence_kl_equals_brute_force_loop():
    gen = torch.Generator().manual_seed(1)
    b, t, v = 3, 9, 17
    pol = torch.randn(b, t, v, generator=gen) * 2
    ref = torch.randn(b, t, v, generator=gen) * 2
    prompt_len = torch.tensor([3, 5, 2])
    comp_len = torch.tensor([4, 5, 1])
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):  # the positions whose logits predict a completion token
        mask[i, int(prompt_len[i]) - 1 : int(prompt_len[i] + comp_len[i]) - 1] = True
    got = sequence_kl(pol, ref, mask)
    for i in range(b):
        total = 0.0
        positions = range(int(prompt_len[i]) - 1, int(prompt_len[i] + comp_len[i]) - 1)
        for pos in positions:
            zp = sum(math.exp(x) for x in pol[i, pos].tolist())
            zq = sum(math.exp(x) for x in ref[i, pos].tolist())
            for a, c in zip(pol[i, pos].tolist(), ref[i, pos].tolist()):
                pa = math.exp(a) / zp
                total += pa * math.log(pa / (math.exp(c) / zq))
        assert got[i].item() == pytest.approx(total / len(positions), rel=1e-5)
    with pytest.raises(ValueError, match="no completion positions"):
        sequence_kl(pol, ref, torch.zeros(b, t, dtype=torch.bool))
    m = kl_metrics(got, "kl_sequence")
    assert set(m) == {"rl/kl_sequence_mean", "rl/kl_sequence_std"}


def test_letter_counts():
    counts = letter_counts(torch.tensor([2, 2, 0, 4, 2]))
    assert counts == {"rl/letter_pred_counts/A": 1.0, "rl/letter_pred_counts/B": 0.0,
                      "rl/letter_pred_counts/C": 3.0, "rl/letter_pred_counts/D": 0.0,
                      "rl/letter_pred_counts/E": 1.0}
    with pytest.raises(ValueError, match="indices must be in 0..4"):
        letter_counts(torch.tensor([5]))
