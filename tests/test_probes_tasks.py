"""Probes on the real pipeline: tokenizer + tasks build the probe set, the engine makes completions.

Checks what only the real tokenizer can show: option spans decode to the option lines, the letter ids
are the tokens the letters get after "Answer:" in the rendered conversation, and a full run with
every probe (greedy completions included) returns the design's metric names and leaves training
numerics untouched.
"""

import dataclasses
import math

import pytest
import torch
from tasks_tokenizer import trained_tokenizer

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks import LETTERS, conversation
from aquainterp.tasks.synthetic import SyntheticTask
from probes.probe_set import build_probe_set
from probes.reference import freeze_reference
from probes.suite import PROBE_NAMES, ProbeSuite


@pytest.fixture(scope="module")
def tokenizer():
    return trained_tokenizer()  # aquainterp.tokenizer.Tokenizer trained on the synthetic corpus


@pytest.fixture(scope="module")
def problems():
    return SyntheticTask(seed=0, split="eval").problems(6)


def model_for(tokenizer, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=256, aspect_ratio=32,
                                     head_dim=32))
    model.init_weights()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
        model.lm_head.weight.normal_(0, 0.3)
    return model


def test_option_spans_decode_to_the_option_lines(tokenizer, problems):
    for item in build_probe_set(tokenizer, problems):
        for letter, text, (start, end) in zip(LETTERS, item.problem.options, item.spans):
            assert tokenizer.decode(list(item.ids[start:end])).strip() == f"{letter}) {text}"
        assert item.gold == LETTERS.index(item.problem.correct)


def test_letter_ids_are_the_letters_as_tokenised_after_answer(tokenizer, problems):
    for item in build_probe_set(tokenizer, problems):
        for letter, letter_id in zip(LETTERS, item.letter_ids):
            as_gold = dataclasses.replace(item.problem, correct=letter)
            prompt = tokenizer.render_for_completion(conversation(as_gold, "direct"))
            # the assistant turn "Answer: X" is tokenised on its own when the chat is rendered for SFT:
            # the decision prompt's tail plus this letter's id must be exactly those tokens
            assert list(item.ids[: len(prompt)]) == list(prompt)
            assert list(item.ids[len(prompt):]) + [letter_id] == tokenizer.encode(f"Answer: {letter}")
        assert len(set(item.letter_ids)) == 5


def test_direct_run_returns_design_metrics_and_greedy_sequence_kl(tokenizer, problems):
    model = model_for(tokenizer)
    suite = ProbeSuite(model, tokenizer, problems, reference_model=freeze_reference(model), batch_size=4,
                       kl_sequences=2, max_new_tokens=6, hardest_k=2, decision="direct")
    metrics = suite.run(0)
    cfg = model.cfg
    expected = {"attn/entropy_mean", "attn/entropy_normalized_mean", "attn/option_mass_mean",
                "attn/gold_option_mass_mean", "attn/chosen_option_mass_mean",
                "rl/letter_margin_mean", "rl/letter_margin_std", "rl/letter_gold_margin_mean",
                "rl/letter_gold_margin_std", "rl/kl_letter_mean", "rl/kl_letter_std",
                "rl/kl_sequence_mean", "rl/kl_sequence_std"}
    expected |= {f"rl/letter_pred_counts/{x}" for x in LETTERS}
    expected |= {f"attn/{kind}/layer{l}/head{h}" for kind in ("entropy", "option_mass")
                 for l in range(cfg.n_layers) for h in range(cfg.n_heads)}
    expected |= {f"probe/logit_lens_gold_margin/layer{l}" for l in range(cfg.n_layers)}
    # the faith family reads the policy's own completions; this untrained one states no letter, so only the
    # counts that need none are there (tests/test_probes_faith.py tests the family)
    expected |= {f"faith/consistency/{k}" for k in ("n", "no_value_frac", "no_letter_frac", "unmatched_frac",
                                                      "arith_error_frac")}
    expected |= {f"faith/gold_prior/{x}" for x in LETTERS} | {"faith/shuffle_n"}
    assert set(metrics) == expected
    assert all(math.isfinite(v) for v in metrics.values())
    assert sum(metrics[f"rl/letter_pred_counts/{x}"] for x in LETTERS) == len(problems)
    assert metrics["rl/kl_letter_mean"] == 0.0 and metrics["rl/kl_sequence_mean"] == 0.0
    assert suite.last_raw["kl_sequence"].shape == (2,)
    table = suite.last_raw["hardest"]
    completion = table["columns"].index("completion")
    assert len(table["rows"]) == 2 and all(isinstance(row[completion], str) and row[completion] for row in table["rows"])
    figures = suite.attention_figures(prompt_indices=(0,), max_tokens=12)
    assert "attn/patterns/prompt0" in figures and "attn/entropy_heatmap" in figures
    assert tuple(PROBE_NAMES) == ("entropy", "option_mass", "margin", "kl", "counts", "logit_lens", "faith")


def test_completions_without_an_answer_are_counted_never_scored(tokenizer, problems):
    """An untrained model never writes "Answer:": every completion is a no-answer, and no letter or
    attention metric is made up from a position the model never reached."""
    model = model_for(tokenizer)
    suite = ProbeSuite(model, tokenizer, problems, reference_model=freeze_reference(model), batch_size=4,
                       kl_sequences=2, max_new_tokens=6, hardest_k=3)
    metrics = suite.run(0, table=True)
    assert metrics["rl/probe_no_answer_frac"] == 1.0
    assert sum(metrics[f"rl/letter_pred_counts/{x}"] for x in LETTERS) == 0
    assert not any(k.startswith(("attn/", "probe/", "rl/letter_margin", "rl/kl_letter")) for k in metrics)
    assert "rl/kl_sequence_mean" in metrics  # sequence KL still runs along the completions
    rows = suite.last_raw["hardest"]["rows"]
    assert len(rows) == 3 and all(row[3] == "" and row[5] is None for row in rows)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        ProbeSuite(model, None, suite.items, probes=("margin",))
    with pytest.raises(ValueError, match="decision must be one of"):
        ProbeSuite(model, tokenizer, problems, probes=("margin",), decision="prompt")


def test_greedy_probe_run_between_training_steps_changes_nothing(tokenizer, problems):
    def train(probe: bool):
        model = model_for(tokenizer, seed=1)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        suite = ProbeSuite(model, tokenizer, problems[:3], reference_model=freeze_reference(model),
                           kl_sequences=1, max_new_tokens=4, hardest_k=1)
        torch.manual_seed(7)
        for step in range(2):
            x = torch.randint(0, tokenizer.vocab_size, (2, 16))
            loss = model(x[:, :-1], targets=x[:, 1:])
            opt.zero_grad()
            loss.backward()
            if probe and step == 0:
                assert suite.run(step)  # greedy generation, hooks, reference, table
                assert model.training
            opt.step()
        return [p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()]

    (params_a, grads_a), (params_b, grads_b) = train(False), train(True)
    # exact on any CPU: both runs do the same ops on the same shapes in the same order; a probe must add nothing
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_table_completions_only_on_table_steps_and_only_for_the_shown_rows(tokenizer, problems):
    from aquainterp.model.engine import Engine
    from aquainterp.model.kv_cache import KVCache

    model = model_for(tokenizer, seed=2)
    no_faith = tuple(p for p in PROBE_NAMES if p != "faith")  # the faith family decodes every problem itself
    suite = ProbeSuite(model, tokenizer, problems, probes=no_faith, reference_model=freeze_reference(model),
                       batch_size=4, max_new_tokens=5, hardest_k=2, table_every=4, decision="direct")
    prefills, calls = [], []  # every prompt the Engine prefilled (padding cut off); prefill forwards

    def record(module, args, kwargs):
        cache = kwargs.get("kv_cache")
        if isinstance(cache, KVCache) and args[0].shape[1] > 1:  # the Engine's (sequence KL: SharedPrompt)
            pads = [0] * args[0].shape[0] if cache.left_pad is None else cache.left_pad.tolist()
            prefills.extend(row[pad:] for row, pad in zip(args[0].tolist(), pads))
            calls.append(len(pads))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    rollout = [(list(suite.items[0].ids), [5, 6, 7])]  # sampled completions given: KL generates nothing
    prompts = {it.index: list(tokenizer.render_for_completion(conversation(it.problem, "reasoning")))
               for it in suite.items}
    try:
        for step in (0, 2, 4, 6, 8):  # probes every 2 steps, the table every 4
            prefills.clear()
            suite.run(step, completions=rollout)
            if step % 4:
                assert prefills == [] and "hardest" not in suite.last_raw
                continue
            rows = suite.last_raw["hardest"]["rows"]
            assert len(rows) == 2 and sorted(prefills) == sorted(prompts[row[0]] for row in rows)
        prefills.clear()
        calls.clear()
        suite.run(6, completions=rollout, table=True)  # forced, e.g. for the last step of a run
        assert len(prefills) == 2 and "hardest" in suite.last_raw
        assert calls == [2]  # both rows' completions decoded together
        prefills.clear()
        suite.run(0)  # no rollouts: greedy completions for sequence KL, which the table rows reuse
        assert sorted(prefills) == sorted(prompts.values()) and len(prefills) == len(problems)
    finally:
        handle.remove()
    engine, stop = Engine(model), [tokenizer.encode_special("<|assistant_end|>")]
    for row in suite.last_raw["hardest"]["rows"]:
        greedy = engine.generate(prompts[row[0]], max_new_tokens=5, temperature=0.0, stop_tokens=stop)
        assert row[suite.last_raw["hardest"]["columns"].index("completion")] == tokenizer.decode(greedy.completions[0])
