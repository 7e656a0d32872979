"""Probes wired to the real GPT through its hook points: ground truths injected with hooks.

The probe set here is built by hand (token ids, option spans, letter ids) so that each test controls
exactly what the probes should see; tests/test_probes_tasks.py builds it from the real tokenizer.
"""

import math

import pytest
import torch

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks.problem import MCProblem
from probes.probe_set import ProbeItem
from probes.reference import freeze_reference
from probes.suite import ProbeSuite, due, parse_probes

VOCAB = 64
LETTER_IDS = (40, 41, 42, 43, 44)
SPANS = ((4, 7), (7, 10), (10, 12), (12, 15), (15, 18))


def tiny_model(seed=0, layers=2, heads=2):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=layers, n_head=heads, n_kv_head=heads,
                          n_embd=16 * heads))
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections; give the test model real signal
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.5)
    return model


def items(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 22 + 3 * i  # different lengths: batches are right-padded
        ids = torch.randint(0, 40, (length,), generator=gen).tolist()
        problem = MCProblem(question=f"q{i}", options=("1", "2", "3", "4", "5"), rationale="",
                            correct="ABCDE"[i % 5], source=f"test:{i}")
        out.append(ProbeItem(i, problem, tuple(ids), SPANS, LETTER_IDS, i % 5))
    return out


def suite(model, probes, **kw):
    kw.setdefault("table_completions", False)
    return ProbeSuite(model, None, items(kw.pop("n", 5)), probes=probes, decision="direct", **kw)


def set_pattern(fn):
    """A forward hook replacing every hook_pattern by fn(T) -> [T, T] (broadcast over batch and heads)."""
    def hook(pattern, hook):
        return fn(pattern.shape[-1]).to(pattern.dtype).expand_as(pattern).clone()
    return (lambda name: name.endswith("hook_pattern"), hook)


def uniform_causal(t):
    return torch.ones(t, t).tril() / torch.arange(1, t + 1)[:, None]


def test_injected_uniform_pattern_gives_log_n_and_one_hot_gives_zero():
    model = tiny_model()
    s = suite(model, ("entropy",), entropy_window=4)
    expected = torch.tensor([[math.log(length - k) for k in range(4)] for length in
                             (len(it.ids) for it in s.items)], dtype=torch.float64).mean()
    with model.hooks(fwd_hooks=[set_pattern(uniform_causal)]):
        m = s.run(0)
    heads = [k for k in m if k.startswith("attn/entropy/layer")]
    assert len(heads) == 2 * 2
    for k in heads:
        assert abs(m[k] - expected.item()) < 1e-6, k
    assert abs(m["attn/entropy_normalized_mean"] - 1.0) < 1e-6
    one_hot = lambda t: torch.eye(t)[[0] * t]  # every query attends to key 0 only
    with model.hooks(fwd_hooks=[set_pattern(one_hot)]):
        m = s.run(1)
    assert all(m[k] == 0.0 for k in heads) and m["attn/entropy_mean"] == 0.0
    assert m["attn/entropy_normalized_mean"] == 0.0


def test_real_patterns_have_normalized_entropy_in_unit_interval_and_match_the_cache():
    model = tiny_model(seed=3)
    s = suite(model, ("entropy",), entropy_window=3)  # the decision position and the two before it
    s.run(0)
    norm = s.last_raw["entropy_normalized"]
    assert (norm >= 0).all() and (norm <= 1).all() and (norm > 0).any()
    # reference: entropies of the last three rows read from run_with_cache, one prompt at a time
    want = torch.zeros(2, 2, dtype=torch.float64)
    want_decision = torch.zeros(2, 2, dtype=torch.float64)
    for it in s.items:
        _, cache = model.run_with_cache(torch.tensor([it.ids]), names_filter=lambda n: n.endswith("hook_pattern"))
        for layer in range(2):
            rows = cache["pattern", layer][0, :, -3:].double()  # [H, 3, T]
            ent = -(rows * rows.clamp_min(1e-300).log()).sum(-1)  # [H, 3]
            want[layer] += ent.mean(-1) / len(s.items)
            want_decision[layer] += ent[:, -1] / len(s.items)
    assert torch.allclose(torch.from_numpy(s.last_raw["entropy"]), want, atol=1e-6)
    assert torch.allclose(torch.from_numpy(s.last_raw["decision_entropy"]), want_decision, atol=1e-6)


def test_freeze_reference_is_an_independent_frozen_copy():
    model = tiny_model(seed=8)
    model.train()
    reference = freeze_reference(model, "cpu")
    x = torch.randint(0, VOCAB, (2, 9))
    # exact on any CPU: a copy of the same weights through the same kernels on the same shapes
    assert torch.equal(reference(x), model(x))
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(reference(x), model(x))  # no shared storage
    assert reference.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    with pytest.raises(TypeError, match="has no .config"):
        freeze_reference(torch.nn.Linear(2, 2))


def test_pattern_forced_onto_option_c_gives_mass_one_on_c():
    model = tiny_model()
    c_start, c_end = SPANS[2]

    def only_c(t):
        p = torch.zeros(t, t)
        p[:, 0] = 1.0  # queries before the span ends attend to the first token
        p[c_end - 1:, 0] = 0.0
        p[c_end - 1:, c_start:c_end] = 1.0 / (c_end - c_start)
        return p

    s = suite(model, ("option_mass", "margin"))
    with model.hooks(fwd_hooks=[set_pattern(only_c)]):
        m = s.run(0)
    per_option = s.last_raw["option_mass_per_option"]  # [N, L, H, 5]
    assert abs(per_option[..., 2] - 1.0).max() < 1e-6
    assert abs(per_option[..., [0, 1, 3, 4]]).max() == 0.0
    assert abs(m["attn/option_mass_mean"] - 1.0) < 1e-6
    assert all(abs(m[f"attn/option_mass/layer{l}/head{h}"] - 1.0) < 1e-6 for l in range(2) for h in range(2))
    golds = [it.gold for it in s.items]
    assert abs(m["attn/gold_option_mass_mean"] - golds.count(2) / len(golds)) < 1e-6


def test_hand_set_lm_head_gives_known_margins():
    model = tiny_model()
    d = model.config.n_embd
    wanted = torch.tensor([1.0, 4.0, -2.0, 3.0, 0.5])  # pre-softcap letter logits
    direction = torch.zeros(d)
    direction[0] = math.sqrt(d)  # an RMS-normalised residual: all of it on channel 0
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[list(LETTER_IDS), 0] = wanted / math.sqrt(d)
    fix_resid = ("ln_final.hook_normalized", lambda x, hook: direction.expand_as(x).clone())
    s = suite(model, ("margin", "counts"))
    with model.hooks(fwd_hooks=[fix_resid]):
        m = s.run(0)
    capped = 15 * torch.tanh(wanted / 15)  # the model soft-caps its logits
    top, second = capped[1].item(), capped[3].item()
    assert m["rl/letter_margin_mean"] == pytest.approx(top - second, abs=1e-5)
    assert m["rl/letter_margin_std"] == pytest.approx(0.0, abs=1e-6)
    gold_margins = [capped[g].item() - capped[[j for j in range(5) if j != g]].max().item()
                    for g in (it.gold for it in s.items)]
    assert s.last_raw["letter_gold_margin"].tolist() == pytest.approx(gold_margins, abs=1e-5)
    assert m["rl/letter_pred_counts/B"] == 5.0 and m["rl/letter_pred_counts/A"] == 0.0


def test_kl_identical_reference_is_exactly_zero_and_drift_matches_brute_force():
    model = tiny_model()
    reference = freeze_reference(model, "cpu")
    s = suite(model, ("kl",), reference_model=reference, n=3)
    pairs = [(list(it.ids), [5, 6, 7, 8][: 2 + it.index]) for it in s.items]
    m = s.run(0, completions=pairs)
    assert m["rl/kl_letter_mean"] == 0.0 and m["rl/kl_letter_std"] == 0.0
    assert m["rl/kl_sequence_mean"] == 0.0 and m["rl/kl_sequence_std"] == 0.0
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.3)
        model.blocks[0].attn.c_q.weight.add_(torch.randn_like(model.blocks[0].attn.c_q.weight) * 0.3)
    m = s.run(1, completions=pairs)

    def kl(p_logits, q_logits):
        p = [math.exp(x) for x in p_logits]
        q = [math.exp(x) for x in q_logits]
        zp, zq = sum(p), sum(q)
        return sum(a / zp * math.log((a / zp) / (b / zq)) for a, b in zip(p, q))

    letter, seq = [], []
    with torch.no_grad():
        for prompt, completion in pairs:
            pl, rl = model(torch.tensor([prompt]))[0, -1], reference(torch.tensor([prompt]))[0, -1]
            letter.append(kl(pl[list(LETTER_IDS)].tolist(), rl[list(LETTER_IDS)].tolist()))
            per_token = []
            for j in range(len(completion)):  # one forward per prefix: no batching, no padding, no mask
                prefix = torch.tensor([prompt + completion[:j]])
                per_token.append(kl(model(prefix)[0, -1].tolist(), reference(prefix)[0, -1].tolist()))
            seq.append(sum(per_token) / len(per_token))
    assert s.last_raw["kl_letter"].tolist() == pytest.approx(letter, rel=1e-4, abs=1e-7)
    assert s.last_raw["kl_sequence"].tolist() == pytest.approx(seq, rel=1e-4, abs=1e-7)
    assert m["rl/kl_sequence_mean"] == pytest.approx(sum(seq) / len(seq), rel=1e-4)
    assert min(seq) > 0


def test_one_policy_forward_per_batch_and_reference_letters_computed_once():
    """Entropy, option mass, margins, counts and letter KL share one hooked policy forward per probe
    batch; the frozen reference's letter logits are computed on the first run only, and again when its
    weights change in place."""
    model = tiny_model(seed=6)
    reference = freeze_reference(model, "cpu")
    s = suite(model, ("entropy", "option_mass", "margin", "kl", "counts"), reference_model=reference,
              batch_size=2)  # 5 items: 3 probe batches
    forwards = {"policy": 0, "reference": 0}
    # lm_head runs once per forward (run_with_hooks calls GPT.forward directly, past module hooks)
    handles = [m.lm_head.register_forward_hook(lambda *_, who=who: forwards.__setitem__(who, forwards[who] + 1))
               for who, m in (("policy", model), ("reference", reference))]
    pairs = [(list(it.ids), [5, 6, 7]) for it in s.items[:3]]  # 3 prompts: 2 sequence-KL forwards each
    try:
        counts = []
        for step in range(3):
            if step == 2:
                with torch.no_grad():
                    reference.lm_head.weight.add_(torch.randn_like(reference.lm_head.weight) * 0.3)
            forwards.update(policy=0, reference=0)
            m = s.run(step, completions=pairs)
            counts.append(dict(forwards))
            if step < 2:
                assert m["rl/kl_letter_mean"] == 0.0 and m["rl/kl_sequence_mean"] == 0.0
    finally:
        for h in handles:
            h.remove()
    assert counts == [{"policy": 9, "reference": 9}, {"policy": 9, "reference": 6}, {"policy": 9, "reference": 9}]
    with torch.no_grad():  # the recomputed reference letters are the edited reference's, prompt by prompt
        want = []
        for it in s.items:
            p = model(torch.tensor([it.ids]))[0, -1, list(LETTER_IDS)].log_softmax(-1)
            q = reference(torch.tensor([it.ids]))[0, -1, list(LETTER_IDS)].log_softmax(-1)
            want.append(float((p.exp() * (p - q)).sum()))
    assert s.last_raw["kl_letter"].tolist() == pytest.approx(want, rel=1e-4, abs=1e-7) and min(want) > 0


def test_batching_and_padding_do_not_change_results():
    model = tiny_model(seed=1)
    a = suite(model, ("entropy", "option_mass", "margin", "counts"), batch_size=1).run(0)
    b = suite(model, ("entropy", "option_mass", "margin", "counts"), batch_size=4).run(0)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-5), k


def test_length_sorted_batches_report_in_probe_set_order():
    """Probe batches are formed in order of prompt length; every per-item result still belongs to its
    own item: shuffled lengths, batches of 2, each row checked against a plain forward of that item."""
    model = tiny_model(seed=3)
    shuffled = [items(6)[i] for i in (4, 0, 5, 2, 1, 3)]
    shuffled = [ProbeItem(k, it.problem, it.ids, it.spans, it.letter_ids, it.gold) for k, it in enumerate(shuffled)]
    s = ProbeSuite(model, None, shuffled, probes=("entropy", "option_mass", "margin", "kl", "counts"), decision="direct",
                   reference_model=freeze_reference(model), batch_size=2, table_completions=False)
    widths = []  # the padded width of every policy forward, read at its embedding
    record = ("hook_embed", lambda x, hook: widths.append(x.shape[1]))
    with model.hooks(fwd_hooks=[record]):
        s.run(0, completions=[(list(shuffled[0].ids), [5, 6])])
    lengths = sorted(len(it.ids) for it in shuffled)
    assert widths[:3] == [lengths[1], lengths[3], lengths[5]]  # batches of 2 in order of length
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([it.ids]))[0, -1, list(LETTER_IDS)] for it in shuffled])
    torch.testing.assert_close(torch.as_tensor(s.last_raw["letter_logits"]), want, atol=1e-5, rtol=0)
    assert s.last_raw["gold"].tolist() == [it.gold for it in shuffled]
    assert s.last_raw["predicted"].tolist() == want.argmax(-1).tolist()
    assert s.last_raw["kl_letter"].tolist() == [0.0] * 6  # reference letters in the same order as the policy's


def test_counts_match_argmax_of_a_plain_forward():
    model = tiny_model(seed=2)
    s = suite(model, ("counts",))
    m = s.run(0)
    want = [0] * 5
    with torch.no_grad():
        for it in s.items:
            want[int(model(torch.tensor([it.ids]))[0, -1, list(LETTER_IDS)].argmax())] += 1
    assert [m[f"rl/letter_pred_counts/{x}"] for x in "ABCDE"] == want


def test_probe_run_between_training_steps_changes_nothing():
    def train(probe: bool):
        model = tiny_model(seed=4)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        s = suite(model, ("entropy", "option_mass", "margin", "kl", "counts"),
                  reference_model=freeze_reference(model), kl_sequences=2, max_new_tokens=4)
        torch.manual_seed(123)
        for step in range(2):
            x = torch.randint(0, VOCAB, (2, 12))  # drawn from the global RNG: a probe must not move it
            loss = model(x[:, :-1], targets=x[:, 1:])
            opt.zero_grad()
            loss.backward()
            if step == 0 and probe:
                s.run(step, completions=[([1, 2, 3], [4, 5, 6])])  # hooks, reference forwards, KL
                assert model.training
                assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_points())
            opt.step()
        return [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]

    grads_a, params_a = train(probe=False)
    grads_b, params_b = train(probe=True)
    # exact on any CPU: both runs do the same ops on the same shapes in the same order; a probe must add nothing
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_attention_hooks_only_when_an_attention_probe_is_on_and_nothing_when_off():
    model = tiny_model()
    seen = []
    handle = model.blocks[0].attn.register_forward_pre_hook(
        lambda mod, args: seen.append(mod.needs_explicit_attention()))
    try:
        suite(model, ("margin", "counts")).run(0)
        assert seen and not any(seen)  # fused SDPA path: no hook on the pattern
        seen.clear()
        suite(model, ("entropy",)).run(0)
        assert seen and all(seen)
        seen.clear()
        off = ProbeSuite(model, None, items(), probes="none")
        assert off.run(0) == {} and off.last_raw == {} and seen == []
    finally:
        handle.remove()


def test_hardest_table_lists_lowest_gold_margins_first():
    model = tiny_model(seed=5)
    s = suite(model, ("margin",), hardest_k=3)
    s.run(0)
    table = s.last_raw["hardest"]
    margins = [row[table["columns"].index("gold_margin")] for row in table["rows"]]
    assert len(margins) == 3 and margins == sorted(margins)
    assert min(margins) == pytest.approx(float(s.last_raw["letter_gold_margin"].min()), abs=1e-4)
    row = table["rows"][0]
    assert row[table["columns"].index("gold_letter")] == s.items[row[0]].problem.correct


def test_attention_figures_have_one_heatmap_per_layer_and_head():
    model = tiny_model()
    s = suite(model, ("entropy", "option_mass"))
    s.run(0)
    figs = s.attention_figures(prompt_indices=(1,), max_tokens=10)
    assert set(figs) == {"attn/patterns/prompt1", "attn/entropy_heatmap", "attn/option_mass_heatmap",
                         "attn/gold_option_mass_heatmap"}
    grid = figs["attn/patterns/prompt1"]
    assert len(grid.data) == 4 and grid.data[0].z.shape == (10, 10)
    assert list(grid.data[0].x) == [f"{i}:{t}" for i, t in enumerate(s.items[1].ids)][-10:]  # no tokenizer: ids
    with pytest.raises(IndexError, match="prompt index 9 outside the probe set of 5"):
        s.attention_figures(prompt_indices=(9,))


def test_bad_input_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown probe\\(s\\) \\['entropie'\\]"):
        parse_probes("entropy,entropie")
    with pytest.raises(ValueError, match="'kl' probe needs reference_model"):
        suite(model, ("kl",))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        suite(model, ("margin",), batch_size=0)
    with pytest.raises(ValueError, match="ProbeSuite: table_every must be >= 0 .* got -1"):
        suite(model, ("margin",), table_every=-1)
    s = suite(model, ("kl",), reference_model=freeze_reference(model))
    with pytest.raises(ValueError, match="completion pair 1 has an empty completion"):
        s.run(0, completions=[([1, 2], [3]), ([1, 2], [])])
    with pytest.raises(TypeError, match="completions\\[0\\] must be a \\(prompt_ids, completion_ids\\) pair"):
        s.run(0, completions=[7])
    assert parse_probes("none") == () and parse_probes("kl, counts") == ("kl", "counts")
    assert [due(s, 5) for s in (0, 3, 5, 10)] == [True, False, True, True] and not due(5, 0)


def test_log_raw_writes_histograms_table_and_figures_through_the_logger(tmp_path):
    import json

    from aquainterp.logger import Logger

    model = tiny_model()
    s = suite(model, ("entropy", "option_mass", "margin", "kl", "counts"), reference_model=freeze_reference(model),
              hardest_k=2, table_every=1)  # a table on every probe step, step 3 included
    logger = Logger(tmp_path, mode="disabled")
    metrics = s.run(3, completions=[([1, 2, 3], [4, 5])])
    logger.log(metrics, step=3)
    s.log_raw(logger, 3, figures=(0,))
    logger.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_name = {k: v for row in rows for k, v in row.items() if k != "step"}
    assert all(row["step"] == 3 for row in rows)
    assert by_name["rl/letter_margin"]["values"] == pytest.approx(s.last_raw["letter_margin"].tolist())
    assert by_name["rl/kl_sequence"]["values"] == [0.0]
    assert by_name["rl/hardest_questions"]["_type"] == "table" and len(by_name["rl/hardest_questions"]["rows"]) == 2
    assert by_name["attn/patterns/prompt0"]["_type"] == "plotly"
    assert (tmp_path / by_name["attn/entropy_heatmap"]["path"]).is_file()
    assert by_name["attn/entropy_mean"] == metrics["attn/entropy_mean"]
