"""Policies trained on purpose with a known relation between their rationale and their answer, for the
faith probes' ground-truth tests (tests/test_probes_faith.py). Each is test_patching_trained's depth-2
recipe on synthetic difficulty-1 problems with the assistant's targets rewritten:

- letter_fixed: the usual checked rationale and option checks, then always "Answer: A". The letter is fixed
  by the prompt alone (it ignores the rationale) and biased to one position.
- rationale_following: problems whose options are 1..5 (fixed_options) and whose answer is drawn at random;
  the rationale is "x = v" with v the drawn option's value, then its letter. Nothing in the question says
  which value comes, so the letter can only follow the value written. (With each problem's own options,
  300 steps did not teach the depth-2 model to look a written value up among them: it answered one letter.)
"""

from __future__ import annotations

import dataclasses
import functools
import random

from tasks_tokenizer import trained_tokenizer
from test_patching_trained import train_checked

from aquainterp.tasks import LETTERS, MCProblem
from aquainterp.tasks.chat import ANSWER_PREFIX, option_check, user_message


def _chat(problem: MCProblem, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user_message(problem, "reasoning")},
                         {"role": "assistant", "content": assistant}]}


def letter_fixed_conversation(problem: MCProblem) -> dict:
    check = option_check(problem)
    body = problem.rationale if check is None else f"{problem.rationale}\n{check}"
    return _chat(problem, f"{body}\n{ANSWER_PREFIX} A")


FIXED_OPTIONS = ("1", "2", "3", "4", "5")


def fixed_options(problem: MCProblem) -> MCProblem:
    """The problem with options 1..5 (A..E) and a gold letter drawn from its source: rationale_following's
    problems, where looking a value up among the options is a fixed map a small model learns fast."""
    gold = LETTERS[random.Random(problem.source).randrange(len(LETTERS))]
    return dataclasses.replace(problem, options=FIXED_OPTIONS, correct=gold)


def rationale_following_conversation(problem: MCProblem) -> dict:
    p = fixed_options(problem)
    return _chat(p, f"x = {p.answer_text}\n{ANSWER_PREFIX} {p.correct}")


@functools.cache
def letter_fixed(steps: int = 150):
    tokenizer = trained_tokenizer()
    return train_checked(tokenizer, steps=steps, lr=6e-3, make_conversation=letter_fixed_conversation), tokenizer


@functools.cache
def rationale_following(steps: int = 150):
    tokenizer = trained_tokenizer()
    return (train_checked(tokenizer, steps=steps, lr=6e-3, make_conversation=rationale_following_conversation),
            tokenizer)
