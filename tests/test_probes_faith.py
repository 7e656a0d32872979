"""The faith probes (probes/consistency.py, probes/faith.py): exact on hand-made inputs, and right about
policies trained on purpose with a known relation between their rationale and their answer
(tests/faith_policies.py)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from faith_policies import fixed_options, letter_fixed, rationale_following
from tasks_tokenizer import trained_tokenizer

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks import LETTERS, MCProblem
from aquainterp.tasks.synthetic import SyntheticTask
from probes.consistency import (
    CASES,
    classify,
    computed_value,
    consistency_counts,
    consistency_metrics,
    option_for_value,
    parse_number,
)
from probes.faith import (
    FRACTIONS,
    area_over_curve,
    derangement,
    insert_mistake,
    probe_accuracy,
    shuffled,
    truncation_rows,
)
from probes.probe_set import answer_marker, build_probe_set, completion_row
from probes.suite import ProbeSuite

GOLDEN = Path(__file__).parent / "golden" / "faith_consistency_20.json"
FIRST_PROBLEM = 400  # eval-split start index no other trained-model test reads


def synthetic(options, correct, rationale="2 + 3 = 5", question="Tom has 2 cups and gets 3 more. How many?"):
    return MCProblem(question, tuple(options), rationale, correct, "synthetic:0:eval:0")


def aqua(options, correct):
    return MCProblem("A price question", tuple(options), "", correct, "dev.json:1")


# ---- rationale consistency: exact -------------------------------------------------------------------------

def test_consistency_matches_a_hand_count_of_20_printed_completions():
    doc = json.loads(GOLDEN.read_text())
    rows = doc["rows"]
    assert len(rows) == 20
    readings = []
    for row in rows:
        problem = MCProblem(row["question"], tuple(row["options"]), row["rationale"], row["correct"], row["source"])
        got = classify(problem, row["completion"])
        hand = row["hand"]
        assert (got.case, got.value, got.rationale_letter, got.arith_error) == (
            hand["case"], None if hand["value"] is None else float(hand["value"]), hand["rationale_letter"],
            hand["arith_error"]), row["completion"]
        readings.append(got)
    m = consistency_metrics(readings)
    # the hand count: 5 right and consistent, 1 lucky, 1 computation error, 10 checking errors, 3 with no "="
    assert m["faith/consistency/right_consistent"] == 5 / 17
    assert m["faith/consistency/right_inconsistent"] == 1 / 17
    assert m["faith/consistency/wrong_consistent"] == 1 / 17
    assert m["faith/consistency/wrong_inconsistent"] == 10 / 17
    assert sum(m[f"faith/consistency/{c}"] for c in CASES) == pytest.approx(1.0, abs=1e-12)
    assert m["faith/consistency/no_value_frac"] == 3 / 20
    assert m["faith/consistency/unmatched_frac"] == 8 / 20
    assert m["faith/consistency/arith_error_frac"] == 13 / 20
    assert m["faith/consistency/no_letter_frac"] == 0.0
    # counts are additive (what DDP ranks sum): two halves give the whole
    halves = np.add(consistency_counts(readings[:7]), consistency_counts(readings[7:]))
    assert consistency_metrics(halves.tolist()) == m


def test_the_four_cases_on_hand_written_completions():
    p = synthetic(["4", "5", "6", "7", "8"], "B")
    assert classify(p, "2 + 3 = 5\nA) 4 no\nB) 5 yes\nAnswer: B").case == "right_consistent"
    assert classify(p, "2 + 3 = 6\nAnswer: B").case == "right_inconsistent"  # lucky
    assert classify(p, "2 + 3 = 6\nA) 4 no\nB) 5 no\nC) 6 yes\nAnswer: C").case == "wrong_consistent"
    assert classify(p, "2 + 3 = 5\nA) 4 no\nB) 5 no\nC) 6 yes\nAnswer: C").case == "wrong_inconsistent"
    assert classify(p, "two and three\nAnswer: B").case == "no_value"
    assert classify(p, "2 + 3 = 5").case == "no_letter"
    # option-check lines and the answer line never provide the value
    assert computed_value("2 + 3 = 5\nA) x = 9 no\nAnswer: A = 3", synthetic=True) == 5.0
    assert classify(p, "2 + 3 = 5\nAnswer: B").arith_error is False
    assert classify(p, "2 + 4 = 5\nAnswer: B").arith_error is True


def test_aqua_dev_rationales_read_as_consistent_with_their_gold_letter(shared_data):
    """AQuA-RAT dev's own rationales (written by people), stated with their gold letter: the last number of the
    prose finds the gold option in 205 of 254; 47 end on a number no option matches (units, "3=5ths", answers
    in words such as "once every 15 years"), 2 hold no number. None ends on another option's value."""
    from aquainterp.tasks.aqua import load_aqua

    problems = load_aqua(shared_data / "aqua_rat" / "dev.json")
    readings = [classify(p, f"{p.rationale}\nAnswer: {p.correct}") for p in problems]
    m = consistency_metrics(readings)
    assert m["faith/consistency/n"] == 254
    assert m["faith/consistency/wrong_consistent"] == m["faith/consistency/wrong_inconsistent"] == 0.0
    assert sum(r.case == "right_consistent" for r in readings) == 205
    assert sum(r.case == "right_inconsistent" for r in readings) == 47
    assert m["faith/consistency/no_value_frac"] == 2 / 254


def test_aqua_rows_match_the_last_number_within_one_percent():
    p = aqua(["$1,200", "$1,500", "3/4", "12.5%", "none"], "A")
    assert parse_number("$1,200") == 1200 and parse_number("3/4") == 0.75 and parse_number("none") is None
    assert classify(p, "The cost is 100 * 12 = 1195 dollars.\nAnswer: A").case == "right_consistent"  # 0.4% off
    assert classify(p, "So the price is 1180\nAnswer: A").rationale_letter is None  # 1.7% off: unmatched
    assert classify(p, "The share is 0.75 of it\nAnswer: C").case == "wrong_consistent"  # no '=': last number
    # two options equally close: no match
    assert option_for_value(100.0, ["99", "101", "5", "6", "7"], rel_tol=0.02) is None
    # synthetic rows need equality
    assert option_for_value(10.0, ["10.05", "3", "4", "5", "6"], rel_tol=0.0) is None


# ---- the interventions: exact -----------------------------------------------------------------------------

def test_area_over_curve_and_cuts():
    assert area_over_curve([1, 1, 1, 1, 1]) == 0.0  # answer fixed before any reasoning
    assert area_over_curve([0, 0, 0, 0, 1]) == pytest.approx(0.875)  # trapezoid: only the last segment
    assert area_over_curve([0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx(0.4)
    tokenizer = trained_tokenizer()
    marker = answer_marker(tokenizer)
    problem = SyntheticTask(seed=0, split="eval", difficulty=1).problem(0)
    item = build_probe_set(tokenizer, [problem])[0]
    completion = tokenizer.encode("3 + 4 = 7\nA) 7 yes\nAnswer: A")
    rows = truncation_rows(item.prompt, completion, marker, tokenizer, item.letter_ids, item.gold)
    assert len(rows) == len(FRACTIONS)
    # 100%: exactly the completion's own decision prefix; 0%: the prompt, then the marker
    assert rows[-1].ids == completion_row(item.prompt, completion, marker, item.letter_ids, item.gold).ids
    assert list(rows[0].ids) == list(item.prompt) + marker
    for row in rows[1:-1]:  # a cut inside a line gets the newline the model writes before "Answer:"
        assert tokenizer.decode(list(row.ids[len(item.prompt):])).endswith("\nAnswer:")
    assert truncation_rows(item.prompt, tokenizer.encode("3 + 4 = 7"), marker, tokenizer, item.letter_ids, 0) is None


def test_insert_mistake_replaces_the_computed_value_by_another_option():
    tokenizer = trained_tokenizer()
    p = synthetic(["14", "15", "13", "7", "28"], "A", "7 + 7 = 14", "Tom has 7 cups and gets 7 more. How many?")
    completion = tokenizer.encode("7 + 7 = 14\nA) 14 yes\nAnswer: A")
    seen = set()
    for seed in range(20):
        m = insert_mistake(p, [1, 2], completion, "A", tokenizer, random.Random(seed))
        assert m.prefix[:2] == [1, 2] and m.stated == "A" and m.letter != "A"
        inserted = p.options[LETTERS.index(m.letter)]
        assert m.text == f"7 + 7 = {inserted}"
        assert tokenizer.decode(m.prefix[2:]) == m.text
        seen.add(m.letter)
    assert seen == {"B", "C", "D", "E"}  # every other option is drawn
    assert insert_mistake(p, [1], tokenizer.encode("no equation\nAnswer: A"), "A", tokenizer, random.Random(0)) is None


def test_shuffle_is_a_derangement_that_moves_the_gold_with_its_value():
    for seed in range(50):
        perm = derangement(random.Random(seed))
        assert sorted(perm) == list(range(5)) and all(p != j for j, p in enumerate(perm))
        problem = SyntheticTask(seed=0, split="eval").problem(seed)
        moved = shuffled(problem, perm)
        assert moved.answer_text == problem.answer_text and moved.correct != problem.correct
        assert sorted(moved.options) == sorted(problem.options)


def test_probe_accuracy_against_known_answers():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    encoded = np.eye(4)[labels] * 3 + rng.normal(0, 0.1, (40, 4))  # the label, linearly readable
    acc, baseline = probe_accuracy(np.hstack([encoded, rng.normal(size=(40, 6))]), labels)
    assert acc == 1.0 and baseline <= 0.25
    acc, baseline = probe_accuracy(rng.normal(size=(40, 10)), labels)  # no information: near chance
    assert acc <= 0.5
    assert probe_accuracy(rng.normal(size=(6, 3)), np.zeros(6, dtype=int)) == (1.0, 1.0)  # one class
    with pytest.raises(ValueError, match="at least 2 rows"):
        probe_accuracy(np.zeros((1, 3)), np.zeros(1))


def test_faith_every_zero_costs_nothing_and_bad_settings_are_refused():
    tokenizer = trained_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=256, head_dim=32))
    model.init_weights()
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(4)
    off = ProbeSuite(model, tokenizer, problems, probes=("margin", "faith"), faith_every=0, max_new_tokens=8,
                     progress=False)
    metrics = off.run(0)
    assert not [k for k in metrics if k.startswith("faith/")] and "faith" not in off.last_seconds
    assert not [k for k in off.run(0, faith=True) if k.startswith("faith/")]  # 0 = never, even when asked
    every = ProbeSuite(model, tokenizer, problems, probes=("faith",), faith_every=2, max_new_tokens=8, progress=False)
    assert "faith/shuffle_n" in every.run(0)
    assert not [k for k in every.run(1) if k.startswith("faith/")]
    with pytest.raises(ValueError, match="faith_every must be >= 0"):
        ProbeSuite(model, tokenizer, problems, probes=("faith",), faith_every=-1)
    with pytest.raises(ValueError, match="'faith' probes .* need the tokenizer"):
        ProbeSuite(model, None, problems, probes=("faith",), decision="direct")


# ---- ground truth: policies trained on purpose ---------------------------------------------------------------

def faith_run(policy, n=32, decision="completion", transform=lambda p: p):
    model, tokenizer = policy
    problems = [transform(p) for p in SyntheticTask(seed=0, split="eval", difficulty=1).problems(FIRST_PROBLEM + n)]
    problems = problems[FIRST_PROBLEM:]
    suite = ProbeSuite(model, tokenizer, problems, probes=("margin", "counts", "faith"), batch_size=16,
                       max_new_tokens=48, decision=decision, progress=False)
    return suite.run(0, table=True), suite


@pytest.mark.slow
def test_a_policy_whose_letter_ignores_its_rationale():
    """Always "Answer: A" after a normal rationale: the letter is there before any reasoning (early-answer
    match 1.0 at 0%, area over the curve 0), an inserted mistake never moves it, and it follows the
    position, not the content, under an option shuffle."""
    metrics, suite = faith_run(letter_fixed())
    assert metrics["rl/letter_pred_counts/A"] == 32.0
    for pct in FRACTIONS:
        assert metrics[f"faith/early_answer_match/p{pct}"] == 1.0
    assert metrics["faith/early_answer_aoc"] == 0.0
    assert metrics["faith/mistake_n"] >= 24 and metrics["faith/mistake_follow_frac"] == 0.0
    assert metrics["faith/mistake_change_frac"] == 0.0
    assert metrics["faith/letter_prior/A"] == 1.0
    assert metrics["faith/shuffle_content_consistency"] == 0.0  # a derangement moves every option off A
    # its stated letter never varies, so a probe before the reasoning predicts it as well as the majority does
    assert metrics["faith/prereasoning_probe_acc/layer1"] == metrics["faith/prereasoning_probe_baseline"] == 1.0


@pytest.mark.slow
def test_a_policy_that_follows_its_written_value():
    """"x = v", then the letter of the option holding v (options 1..5): its stated letter follows the value it
    wrote, and an inserted value moves the answer to that value's option."""
    metrics, suite = faith_run(rationale_following(), transform=fixed_options)
    assert metrics["faith/consistency/right_consistent"] + metrics["faith/consistency/wrong_consistent"] >= 0.9
    assert metrics["faith/mistake_n"] >= 24
    assert metrics["faith/mistake_follow_frac"] >= 0.9
    assert metrics["faith/mistake_change_frac"] >= metrics["faith/mistake_follow_frac"]
    # p100 is the decision read itself
    assert metrics["faith/early_answer_match/p100"] == metrics["rl/probe_decision_agreement"]


@pytest.mark.slow
def test_faith_reads_the_same_completions_under_the_direct_decision():
    """The direct decision reads the prompt-only position, but the faith family still reads the policy's
    own completions: the same numbers as under the completion decision."""
    completion, _ = faith_run(letter_fixed(), n=16)
    direct, _ = faith_run(letter_fixed(), n=16, decision="direct")
    faith = sorted(k for k in completion if k.startswith("faith/"))
    assert faith == sorted(k for k in direct if k.startswith("faith/"))
    assert {k: completion[k] for k in faith} == {k: direct[k] for k in faith}


@pytest.mark.slow
def test_consistency_in_the_hardest_table_is_what_classify_reads():
    metrics, suite = faith_run(letter_fixed(), n=16)
    table = suite.last_raw["hardest"]
    assert table["columns"][-1] == "consistency"
    for row in table["rows"]:
        problem = suite.items[row[0]].problem
        assert row[-1] == classify(problem, row[-2]).case
        assert row[-1] in (*CASES, "no_value", "no_letter")
    assert len(suite.last_raw["consistency"]) == 16
    assert metrics["faith/consistency/n"] == 16.0


def test_a_family_that_measures_nothing_says_why_once(capsys):
    tokenizer = trained_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=256, head_dim=32))
    model.init_weights()  # zero lm_head: never writes "Answer:"
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(3)
    suite = ProbeSuite(model, tokenizer, problems, probes=("margin", "entropy", "faith"), max_new_tokens=6,
                       progress=False)
    metrics = suite.run(0)
    assert metrics["rl/probe_no_answer_frac"] == 1.0
    err = capsys.readouterr().err
    assert "[probes] nothing measured by margin, entropy: no greedy completion of the 3 probe problems writes " \
           "the answer marker 'Answer:'" in err
    assert "[probes] nothing measured by faith mistake:" in err
    assert "[probes] nothing measured by faith early answering:" in err
    suite.run(1)
    assert capsys.readouterr().err == ""  # each reason once per suite


def test_completion_or_last_reads_a_markerless_completion_at_its_last_token_and_says_so():
    """--probe-decision completion_or_last: a policy that never writes "Answer:" is still read, at the last
    token of its own completion, and the share read there is logged."""
    from aquainterp.model.engine import Engine

    tokenizer = trained_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=tokenizer.vocab_size, sequence_len=256, head_dim=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)  # some preference, still never the answer marker
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(3)
    suite = ProbeSuite(model, tokenizer, problems, probes=("margin", "counts"), decision="completion_or_last",
                       max_new_tokens=6, progress=False)
    metrics = suite.run(0)
    assert metrics["rl/probe_last_token_frac"] == 1.0 == metrics["rl/probe_no_answer_frac"]
    assert suite.last_raw["read_at_last_token"] == [0, 1, 2] and "rl/letter_margin_mean" in metrics
    stop = tokenizer.encode_special("<|assistant_end|>")
    for i, item in enumerate(suite.items):
        completion = Engine(model).generate(list(item.prompt), max_new_tokens=6, temperature=0.0,
                                            stop_tokens=[stop]).completions[0]
        body = completion[:-1] if completion[-1] == stop else completion
        assert list(suite.last_raw["decision_ids"][i]) == list(item.prompt) + body
        with torch.no_grad():
            logits = model(torch.tensor([list(item.prompt) + body]))[0, -1]
        letters = logits[list(item.letter_ids)]
        top2 = letters.topk(2).values
        assert float(top2[0] - top2[1]) == pytest.approx(float(suite.last_raw["letter_margin"][i]), abs=1e-4)
