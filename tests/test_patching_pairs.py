"""Clean/corrupted pairs from real tasks and the real tokenizer: each corruption does what it says."""

import random
import re

import pytest
import torch
from tasks_tokenizer import trained_tokenizer
from test_patching import random_gpt

from aquainterp.patching.pairs import make_pairs
from aquainterp.patching.patcher import Patcher
from aquainterp.tasks import LETTERS, MCProblem, decision_prompt, reasoning_decision_prompt
from aquainterp.tasks.aqua import load_aqua
from aquainterp.tasks.synthetic import SyntheticTask, counterfactuals


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return SyntheticTask(seed=0, split="eval").problems(24)


def test_permute_moves_the_gold_option_to_another_letter(tok, problems):
    pairs, skipped = make_pairs(tok, problems, "permute", seed=3)
    assert len(pairs) == len(problems) and skipped == []
    for problem, pair in zip(problems, pairs):
        _, letter_ids = decision_prompt(tok, problem)
        new = letter_ids.index(pair.corrupted_letter_id)
        assert pair.clean_letter_id == letter_ids[problem.answer_index] != pair.corrupted_letter_id
        clean, bad = tok.decode(pair.clean_ids), tok.decode(pair.corrupted_ids)
        assert f"\n{LETTERS[new]}) {problem.answer_text}\n" in bad
        assert f"\n{problem.correct}) {problem.options[new]}\n" in bad
        assert len(pair.clean_ids) == len(pair.corrupted_ids)
        assert clean.replace(problem.options[new], "#").replace(problem.answer_text, "#") == \
            bad.replace(problem.options[new], "#").replace(problem.answer_text, "#")


def _sum_answer(question):
    a, b = map(int, re.match(r"\w+ has (\d+) \w+ and gets (\d+) more\.", question).groups())
    return a + b


def _bags_answer(question):
    a, b, c, d = map(int, re.match(r"\w+ has (\d+) bags of (\d+) \w+ and buys (\d+) more bags\. "
                                    r"Then \w+ gives away (\d+)", question).groups())
    return (a + c) * b - d


@pytest.mark.parametrize("seed", range(5))
def test_numbers_counterfactual_lands_on_another_option(seed):
    """Checked against each template's own arithmetic, written out here independently."""
    cases = [(MCProblem("Tom has 4 pens and gets 18 more. How many pens does Tom have now?",
                        ("23", "14", "72", "22", "21"), "4 + 18 = 22", "D", "t:add"), _sum_answer),
             (MCProblem("Leo has 2 bags of 9 pens and buys 8 more bags. Then Leo gives away 84 pens. "
                        "How many pens are left?", ("5", "6", "90", "7", "8"),
                        "2 + 8 = 10\n10 * 9 = 90\n90 - 84 = 6", "B", "t:bags"), _bags_answer)]
    for problem, answer in cases:
        assert answer(problem.question) == int(problem.answer_text)
        found = list(counterfactuals(problem, random.Random(seed)))
        assert found
        for c in found[:10]:
            assert c.options == problem.options and c.correct != problem.correct
            assert c.options[LETTERS.index(c.correct)] == str(answer(c.question))
            changed = [(x, y) for x, y in zip(re.findall(r"\d+", problem.question), re.findall(r"\d+", c.question))
                       if x != y]
            assert len({x for x, _ in changed}) == 1 and all(len(x) == len(y) for x, y in changed)


def test_numbers_pairs_on_the_synthetic_task(tok, problems):
    pairs, skipped = make_pairs(tok, problems, "numbers", skip_unalignable=True)
    assert len(pairs) >= len(problems) * 3 // 4 and len(pairs) + len(skipped) == len(problems)
    by_name = {p.source: p for p in problems}
    for pair in pairs:
        problem = by_name[pair.name]
        _, letter_ids = decision_prompt(tok, problem)
        assert pair.corrupted_letter_id in letter_ids and pair.corrupted_letter_id != pair.clean_letter_id
        differ = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b]
        assert differ and all(tok.decode([pair.corrupted_ids[i]]).strip().isdigit() for i in differ)


def test_noise_span_is_the_question(tok, problems):
    pairs, _ = make_pairs(tok, problems[:5], "noise")
    for problem, pair in zip(problems, pairs):
        start, end = pair.noise_span
        assert tok.decode(pair.clean_ids[start:end]).strip() == problem.question
        assert pair.corrupted_ids == pair.clean_ids and pair.corrupted_letter_id is None


def test_aqua_pairs_and_errors(tok, shared_data):
    rows = load_aqua(str(shared_data / "aqua_rat" / "dev.json"))[:12]
    pairs, skipped = make_pairs(tok, rows, "permute", skip_unalignable=True)
    assert len(pairs) + len(skipped) == 12 and len(pairs) >= 10
    with pytest.raises(ValueError, match=r"pair .*dev.json:1: corruption 'numbers' needs a rationale"):
        make_pairs(tok, rows[:1], "numbers")
    with pytest.raises(ValueError, match="corruption must be one of"):
        make_pairs(tok, rows[:1], "shuffle")


def test_unalignable_problem_is_named_or_skipped(tok):
    # Every option reads like the gold one: no swap moves the answer anywhere.
    problem = MCProblem("What is x?", ("1", "1", "1", "1", "1"), "", "A", "t:unalignable")
    with pytest.raises(ValueError, match=r"pair t:unalignable: no permute corruption found"):
        make_pairs(tok, [problem], "permute")
    assert make_pairs(tok, [problem], "permute", skip_unalignable=True) == ([], ["t:unalignable"])


def test_sweep_on_real_pairs_with_token_labels(tok, problems):
    model = random_gpt(n_layer=1, vocab=tok.vocab_size)
    pairs, _ = make_pairs(tok, problems[:3], "permute")
    patcher = Patcher(model, pairs, batch_size=64, align="end", progress=False)
    r = patcher.sweep("resid_pre")
    assert r.normalized.shape == (1, patcher.n_pos)
    labels = patcher.position_labels(tok)
    assert labels[-1] == "0: " + tok.token_str(pairs[0].clean_ids[-1]) or labels[-1].endswith("*")
    # At layer 0 a position whose token is the same in both prompts carries nothing: unpatched (up to
    # fp32 rounding: the resumed last block computes the decision query alone); the swapped option
    # tokens do carry something.
    for i, p in enumerate(pairs):
        offset = patcher.n_pos - len(p.clean_ids)
        same = [k for k, (a, b) in enumerate(zip(p.clean_ids, p.corrupted_ids)) if a == b]
        assert len(same) > len(p.clean_ids) - 6
        unpatched = patcher.corrupted_ld[i].expand(len(same))
        torch.testing.assert_close(r.logit_diff[0, [offset + k for k in same], i], unpatched, atol=1e-5, rtol=0)
        differ = [offset + k for k in range(len(p.clean_ids)) if k not in same]
        assert (r.logit_diff[0, differ, i] - patcher.corrupted_ld[i]).abs().max() > 1e-3


def test_reasoning_style_cuts_the_sft_answer_right_before_the_letter(tok, problems):
    from aquainterp.tasks import conversation

    for problem in problems[:6]:
        ids, letters = reasoning_decision_prompt(tok, problem)
        full, mask = tok.render_conversation(conversation(problem, "reasoning"))
        assert full[: len(ids)] == ids and full[len(ids)] == letters[problem.answer_index]
        assert mask[len(ids)] == 1  # the letter is a trained assistant token
    pairs, _ = make_pairs(tok, problems[:4], "permute", style="reasoning")
    for problem, pair in zip(problems, pairs):
        assert problem.rationale.splitlines()[-1] in tok.decode(pair.corrupted_ids)
    noisy, _ = make_pairs(tok, problems[:2], "noise", style="reasoning")
    assert tok.decode(noisy[0].clean_ids[slice(*noisy[0].noise_span)]).strip() == problems[0].question
    with pytest.raises(ValueError, match="'numbers' changes the question"):
        make_pairs(tok, problems[:1], "numbers", style="reasoning")


def test_checked_style_cuts_after_the_option_checks_and_blurs_question_and_options(tok, problems):
    from aquainterp.tasks import conversation
    from aquainterp.tasks.chat import option_check, option_lines

    checked = [p for p in problems if option_check(p) is not None][:6]
    assert len(checked) == 6
    for problem in checked:
        ids, letters = reasoning_decision_prompt(tok, problem, "checked")
        full, mask = tok.render_conversation(conversation(problem, "checked"))
        assert full[: len(ids)] == ids and full[len(ids)] == letters[problem.answer_index]
        assert mask[len(ids)] == 1
        said = tok.decode(ids[ids.index(tok.encode_special("<|assistant_start|>")) + 1:])
        assert said.endswith(f"{option_lines(problem)[problem.answer_index]} yes\nAnswer:")
    pairs, _ = make_pairs(tok, checked[:3], "noise", style="checked")
    for problem, pair in zip(checked, pairs):
        blurred = tok.decode(pair.clean_ids[slice(*pair.noise_span)]).strip()
        assert blurred == "\n".join([problem.question, *option_lines(problem)])
    for corruption in ("permute", "numbers"):
        with pytest.raises(ValueError, match=f"corruption '{corruption}' moves the gold option.*use corruption 'noise'"):
            make_pairs(tok, checked[:1], corruption, style="checked")
