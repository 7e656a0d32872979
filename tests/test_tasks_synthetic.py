"""Synthetic task: determinism, disjoint splits, uniform letters, correct arithmetic, distinct options."""

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquainterp.tasks import LETTERS, extract_letter
from aquainterp.tasks.synthetic import SyntheticTask, corpus, document, split_of


def test_deterministic_and_seed_dependent():
    a = SyntheticTask(seed=3).problems(50)
    assert a == SyntheticTask(seed=3).problems(50)
    assert a[10:20] == SyntheticTask(seed=3).problems(10, start=10)
    first = [p for p, _ in zip(SyntheticTask(seed=3), range(50))]
    assert first == a
    assert [p.question for p in SyntheticTask(seed=4).problems(50)] != [p.question for p in a]


def test_train_and_eval_questions_never_overlap():
    for seed in (0, 1):
        train = {p.question for p in SyntheticTask(seed, "train").problems(4000)}
        evals = {p.question for p in SyntheticTask(seed, "eval").problems(600)}
        assert train.isdisjoint(evals)
        assert all(split_of(q) == "eval" for q in evals) and all(split_of(q) == "train" for q in train)
    # across seeds too: the split is a property of the question text
    assert {p.question for p in SyntheticTask(0, "train").problems(3000)}.isdisjoint(
        {p.question for p in SyntheticTask(7, "eval").problems(600)})


def test_correct_letter_is_uniform():
    counts = Counter(p.correct for p in SyntheticTask(seed=0).problems(5000))
    assert set(counts) == set(LETTERS)
    # chi-square with 4 degrees of freedom; 18.47 is the 0.1% critical value
    chi2 = sum((counts[x] - 1000) ** 2 / 1000 for x in LETTERS)
    assert chi2 < 18.47, counts


def _check_problem(p):
    assert len(set(p.options)) == 5, p
    assert all(re.fullmatch(r"\d+", o) for o in p.options), p
    # every rationale line is "x op y = z" with correct arithmetic; the last result is the gold option
    value = None
    for line in p.rationale.splitlines():
        m = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line)
        assert m, line
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op] == z, line
        value = z
    assert p.options[LETTERS.index(p.correct)] == str(value)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["train", "eval"]), st.sampled_from([None, 1, 2, 3]),
       st.integers(0, 10**6))
def test_any_problem_is_well_formed(seed, split, difficulty, index):
    p = SyntheticTask(seed, split, difficulty).problem(index)
    _check_problem(p)
    assert p.source == f"synthetic:{seed}:{split}:{index}"


def test_difficulty_sets_the_number_of_steps():
    for level, steps in ((1, {1}), (2, {2}), (3, {3, 4})):
        got = {len(p.rationale.splitlines()) for p in SyntheticTask(0, difficulty=level).problems(200)}
        assert got == steps, (level, got)
    mixed = Counter(len(p.rationale.splitlines()) for p in SyntheticTask(0).problems(600))
    assert min(mixed[1], mixed[2], mixed[3] + mixed[4]) > 120, mixed


def test_distractors_include_off_by_one_or_wrong_operation():
    hits = 0
    for p in SyntheticTask(0).problems(300):
        gold = int(p.answer_text)
        others = {int(o) for o in p.options} - {gold}
        hits += bool(others & {gold - 1, gold + 1})
    assert hits > 250


def test_corpus_documents_are_train_problems_with_answers():
    docs = list(corpus(20, seed=5))
    assert docs[0] == document(SyntheticTask(5, "train").problem(0))
    for doc, p in zip(docs, SyntheticTask(5, "train").problems(20)):
        assert doc.startswith(p.question + "\nA) ")
        assert extract_letter(doc) == p.correct


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticTask(split="test")
    with pytest.raises(ValueError, match="difficulty must be 1, 2, 3 or None, got 4"):
        SyntheticTask(difficulty=4)
