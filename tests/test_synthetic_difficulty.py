"""The synthetic task's difficulty reaches every stage that reads it: base text, SFT/mid mixtures, evals."""

import itertools
import re

import pytest

from aquainterp.tasks.synthetic import MAX_NUMBER, SyntheticTask, document
from training.data import documents
from training.mixture import MixtureSpec, build_mixture


def steps_in(doc: str) -> int:
    return sum(bool(re.fullmatch(r"\d+ [-+*/] \d+ = \d+", line)) for line in doc.splitlines())


@pytest.mark.parametrize("level", [1, 2, 3])
def test_base_source_spelling_with_difficulty(level):
    docs = list(itertools.islice(documents(f"synthetic:5:{level}"), 40))
    assert {steps_in(d) for d in docs} <= {1: {1}, 2: {2}, 3: {3, 4}}[level]
    # same problems as the task itself: seed 5, train split, that level
    assert docs[:3] == [document(p) for p in SyntheticTask(5, "train", level).problems(3)]


def test_base_source_without_difficulty_is_the_mix():
    docs = list(itertools.islice(documents("synthetic:5"), 300))
    assert {1, 2}.issubset({steps_in(d) for d in docs}) and max(steps_in(d) for d in docs) >= 3


@pytest.mark.parametrize("bad", ["synthetic:0:4", "synthetic:0:x", "synthetic:y"])
def test_bad_synthetic_source_is_named(bad):
    with pytest.raises(ValueError, match=re.escape(f"data source {bad!r}: expected synthetic[:SEED[:DIFFICULTY]]")):
        next(documents(bad))


def test_mixture_difficulty_keeps_only_that_level():
    chats = build_mixture(MixtureSpec(synthetic=60, synthetic_difficulty=1, styles=("reasoning",)))
    rationales = [c["messages"][1]["content"].split("\nAnswer:")[0] for c in chats]
    assert all(len(r.splitlines()) == 1 for r in rationales)
    mixed = build_mixture(MixtureSpec(synthetic=60, styles=("reasoning",)))
    assert max(len(c["messages"][1]["content"].splitlines()) for c in mixed) > 2


@pytest.mark.parametrize("level", [1, 2, 3, None])
def test_every_number_is_at_most_99(level):
    for p in SyntheticTask(3, "eval", level).problems(300):
        numbers = [int(n) for n in re.findall(r"\d+", "\n".join([p.question, *p.options, p.rationale]))]
        assert max(numbers) <= MAX_NUMBER, p


def test_mixture_accepts_the_checked_style():
    chats = build_mixture(MixtureSpec(synthetic=20, synthetic_difficulty=1, styles=("direct", "checked")))
    checked = [c["messages"][1]["content"] for c in chats if c["messages"][1]["content"].count("\n") >= 2]
    assert len(checked) == 10
    for text in checked:
        *_, match, answer = text.splitlines()
        assert match.endswith(" yes") and answer == f"Answer: {match[0]}"
