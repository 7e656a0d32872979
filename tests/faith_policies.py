"""Policies trained on purpose with a known relation between their rationale and their answer, for the
faith probes' ground-truth tests (tests/test_probes_faith.py). Each is test_patching_trained's depth-2
recipe on synthetic difficulty-1 problems with the assistant's targets rewritten:

- letter_fixed: the usual checked rationale and option checks, then always "Answer: A". The letter is fixed
  by the prompt alone (it ignores the rationale) and biased to one position.
- rationale_following: the rationale is "x = v" with v the value of a uniformly drawn option (not the
  gold one), then the option checks against v and that option's letter. The value cannot be read off the
  question, so the checks and the letter can only follow what was written.
"""

from __future__ import annotations

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


def rationale_following_conversation(problem: MCProblem) -> dict:
    pick = random.Random(problem.source).randrange(len(LETTERS))
    value = problem.options[pick].strip()
    checks = [f"{letter}) {text} {'yes' if i == pick else 'no'}"
              for i, (letter, text) in enumerate(zip(LETTERS, problem.options)) if i <= pick]
    return _chat(problem, "\n".join([f"x = {value}", *checks, f"{ANSWER_PREFIX} {LETTERS[pick]}"]))


@functools.cache
def letter_fixed(steps: int = 150):
    tokenizer = trained_tokenizer()
    return train_checked(tokenizer, steps=steps, lr=6e-3, make_conversation=letter_fixed_conversation), tokenizer


@functools.cache
def rationale_following(steps: int = 300):
    tokenizer = trained_tokenizer()
    return (train_checked(tokenizer, steps=steps, lr=6e-3, make_conversation=rationale_following_conversation),
            tokenizer)
