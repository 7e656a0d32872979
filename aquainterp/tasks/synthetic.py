"""The embedded default task: AQuA-style multiple-choice arithmetic word problems from a seed.

Why this shape: a depth-2..4 GPT with a 1-2k vocabulary has to learn it on a CPU in minutes, so the
questions are short templates over a few names and items with small numbers, the rationale is one line
per arithmetic step ("3 * 4 = 12"), and the five options are plain numbers whose distractors are the
mistakes a solver makes (off by one, the wrong operation, a skipped step). The gold letter is drawn
uniformly from A-E.

Difficulty 1 is one operation, 2 is two steps, 3 is three steps; `difficulty=None` mixes them evenly.

Every number (question, step results, options) is at most MAX_NUMBER = 99: under the nanochat split
(digits in groups of 1-2) such a number is one token, so "the option whose number equals the last
result" is a one-token match a 2-layer attention circuit can learn. Templates whose numbers overflow
are redrawn; distractors above 99 are dropped.

Determinism and splits: problem `i` of (seed, split) comes from its own `random.Random` seeded with the
string "aquainterp-synthetic:<seed>:<split>:<i>" (Python hashes str seeds with SHA-512, so this is
stable across runs and machines). On top of the per-split seeds, each question text is assigned to a
split by its SHA-256 (1 bucket in 8 is "eval"), and a generator only keeps questions of its own
split, so train and eval can never share a question, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Iterator

from aquainterp.tasks.problem import LETTERS, MCProblem

NAMES = ("Tom", "Sam", "Max", "Lily", "Mia", "Ivy", "Leo", "Zoe", "Ray", "Kit")
ITEMS = ("apples", "pens", "books", "cards", "eggs", "coins", "shells", "stamps", "cups", "balls")
SPLITS = ("train", "eval")
EVAL_BUCKETS = 8  # one SHA-256 bucket in EVAL_BUCKETS holds the eval questions
MAX_NUMBER = 99  # one token under the nanochat digit split; larger problems are redrawn


def split_of(question: str) -> str:
    """The split a question text belongs to; fixed by its hash, so splits are disjoint by construction."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


# Each template returns (question, steps, answer, plausible wrong answers).
# steps are (expression, value) pairs; the rationale writes them "expression = value".


def _add(rng):
    n, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 20)
    q = f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?"
    return q, [(f"{a} + {b}", a + b)], a + b, [abs(a - b), a * b]


def _sub(rng):
    n, item, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20)
    a = b + rng.randint(1, 20)
    q = f"{n} has {a} {item} and gives away {b}. How many {item} are left?"
    return q, [(f"{a} - {b}", a - b)], a - b, [a + b]


def _mul(rng):
    n, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{n} buys {a} boxes with {b} {item} in each. How many {item} is that?"
    return q, [(f"{a} * {b}", a * b)], a * b, [a + b]


def _div(rng):
    item, b, k = rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 9)
    q = f"{b * k} {item} are shared equally by {b} friends. How many {item} does each friend get?"
    return q, [(f"{b * k} / {b}", k)], k, [b * k - b]


def _mul_sub(rng):
    n, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b - 1)
    q = f"{n} buys {a} boxes of {b} {item} and gives away {c}. How many {item} are left?"
    return q, [(f"{a} * {b}", a * b), (f"{a * b} - {c}", a * b - c)], a * b - c, [a * b, a + b - c]


def _add_sub(rng):
    n, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    q = f"{n} has {a} {item}, buys {b} more, then gives away {c}. How many {item} are left?"
    return q, [(f"{a} + {b}", a + b), (f"{a + b} - {c}", a + b - c)], a + b - c, [a + b, a + b + c]


def _more_than(rng):
    n, m = rng.sample(NAMES, 2)
    item, a, b = rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 20)
    q = f"{n} has {a} {item} and {m} has {b} more than {n}. How many {item} do they have together?"
    return q, [(f"{a} + {b}", a + b), (f"{a} + {a + b}", 2 * a + b)], 2 * a + b, [a + b, a + 2 * b]


def _two_boxes(rng):
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c, d = (rng.randint(2, 9) for _ in range(4))
    e = rng.randint(1, a * b + c * d - 1)
    q = (f"{n} buys {a} boxes of {b} {item} and {c} boxes of {d} {item}, then gives away {e}. "
         f"How many {item} are left?")
    steps = [(f"{a} * {b}", a * b), (f"{c} * {d}", c * d), (f"{a * b} + {c * d}", a * b + c * d),
             (f"{a * b + c * d} - {e}", a * b + c * d - e)]
    return q, steps, a * b + c * d - e, [a * b + c * d, a * b - e, a + b + c + d - e]


def _bags(rng):
    n, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, (a + c) * b - 1)
    q = (f"{n} has {a} bags of {b} {item} and buys {c} more bags. Then {n} gives away {d} {item}. "
         f"How many {item} are left?")
    total = (a + c) * b
    steps = [(f"{a} + {c}", a + c), (f"{a + c} * {b}", total), (f"{total} - {d}", total - d)]
    return q, steps, total - d, [total, a * b - d, a + c * b - d]


TEMPLATES = {1: (_add, _sub, _mul, _div), 2: (_mul_sub, _add_sub, _more_than), 3: (_two_boxes, _bags)}


def _options(rng: random.Random, answer: int, wrong: list[int]) -> tuple[list[str], str]:
    """Five distinct non-negative numbers: the answer at a uniform letter, plausible mistakes elsewhere."""
    plausible = [w for w in dict.fromkeys(wrong + [answer + 1, answer - 1])
                 if 0 <= w <= MAX_NUMBER and w != answer]
    rng.shuffle(plausible)
    distractors = plausible[:4]
    step = 2
    while len(distractors) < 4:  # small answers: fill with nearby numbers, alternating sides
        for w in (answer + step, answer - step):
            if 0 <= w <= MAX_NUMBER and w != answer and w not in distractors and len(distractors) < 4:
                distractors.append(w)
        step += 1
    rng.shuffle(distractors)
    slot = rng.randrange(len(LETTERS))
    values = distractors[:slot] + [answer] + distractors[slot:]
    return [str(v) for v in values], LETTERS[slot]


def _fits(question: str, steps: list) -> bool:
    """True when every number of the question and of the worked steps is at most MAX_NUMBER."""
    numbers = [int(n) for n in re.findall(r"\d+", question)] + [value for _, value in steps]
    return max(numbers) <= MAX_NUMBER


class SyntheticTask:
    """An infinite, deterministic stream of synthetic MCProblems for one (seed, split, difficulty)."""

    def __init__(self, seed: int = 0, split: str = "train", difficulty: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"SyntheticTask: split must be one of {SPLITS}, got {split!r}")
        if difficulty is not None and difficulty not in TEMPLATES:
            raise ValueError(f"SyntheticTask: difficulty must be 1, 2, 3 or None, got {difficulty!r}")
        self.seed, self.split, self.difficulty = int(seed), split, difficulty

    def problem(self, index: int) -> MCProblem:
        """Problem number `index` of this stream (the same on every call, run and machine)."""
        rng = random.Random(f"aquainterp-synthetic:{self.seed}:{self.split}:{index}")
        while True:  # rejection: keep only questions whose hash puts them in this split
            level = self.difficulty or rng.randint(1, 3)
            question, steps, answer, wrong = rng.choice(TEMPLATES[level])(rng)
            if _fits(question, steps) and split_of(question) == self.split:
                break
        options, letter = _options(rng, answer, wrong)
        rationale = "\n".join(f"{expr} = {value}" for expr, value in steps)
        source = f"synthetic:{self.seed}:{self.split}:{index}"
        return MCProblem(question, tuple(options), rationale, letter, source)

    def problems(self, n: int, start: int = 0) -> list[MCProblem]:
        return [self.problem(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[MCProblem]:
        index = 0
        while True:
            yield self.problem(index)
            index += 1


def document(problem: MCProblem) -> str:
    """Plain-text rendering (question, options, rationale, answer) for tokenizer and base training."""
    options = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, problem.options))
    return f"{problem.question}\n{options}\n{problem.rationale}\nAnswer: {problem.correct}\n"


def corpus(n: int, seed: int = 0, difficulty: int | None = None) -> Iterator[str]:
    """`n` plain-text documents from the train split only, so pretraining never sees eval questions."""
    task = SyntheticTask(seed=seed, split="train", difficulty=difficulty)
    for i in range(n):
        yield document(task.problem(i))


# Reading a rationale back: the "x op y = v" lines SyntheticTask writes, as a computation over the question's
# numbers, so that activation patching can change one number and know which option becomes the answer.

_STEP = re.compile(r"^\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*(\d+)\s*$")
_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
        "/": lambda x, y: x // y if y and x % y == 0 else None}


def rationale_chain(problem: MCProblem):
    """The rationale as a computation over the question's numbers, or None if it is not one.

    Each rationale line "x op y = v" becomes (op, ref, ref); a ref is ("q", value) for a number of the
    question, ("s", k) for the result of step k. A literal that could be both is ambiguous: None."""
    numbers = {int(m) for m in re.findall(r"\d+", problem.question)}
    steps, results = [], []
    for line in problem.rationale.splitlines():
        m = _STEP.match(line)
        if m is None:
            return None
        refs = []
        for literal in (int(m.group(1)), int(m.group(3))):
            is_step, is_question = literal in results, literal in numbers
            if is_step == is_question:
                return None
            refs.append(("s", results.index(literal)) if is_step else ("q", literal))
        steps.append((m.group(2), *refs))
        results.append(int(m.group(4)))
    return steps or None


def _evaluate(steps, values: dict[int, int]) -> int | None:
    """Run a chain with question numbers remapped by `values`; None if a step leaves the naturals."""
    results = []
    for op, *refs in steps:
        x, y = (values.get(v, v) if kind == "q" else results[v] for kind, v in refs)
        out = _OPS[op](x, y)
        if out is None or out < 0:
            return None
        results.append(out)
    return results[-1]


def counterfactuals(problem: MCProblem, rng: random.Random, tries: int = 200) -> Iterator[MCProblem]:
    """Synthetic problems with one question number changed (same digit count, options untouched) so
    that another option is the answer: the "counterfactual numbers" corruption, in a seeded order."""
    steps = rationale_chain(problem)
    if steps is None:
        return
    numbers = sorted({int(m) for m in re.findall(r"\d+", problem.question)})
    candidates = [(old, new) for old in numbers
                  for new in range(10 ** (len(str(old)) - 1) if old >= 10 else 0, 10 ** len(str(old)))
                  if new != old and new not in numbers]
    rng.shuffle(candidates)
    option_letter = {text.strip(): letter for letter, text in zip(LETTERS, problem.options)}
    for old, new in candidates[:tries]:
        answer = _evaluate(steps, {old: new})
        letter = option_letter.get(str(answer))
        if letter is not None and letter != problem.correct:
            question = re.sub(rf"\b{old}\b", str(new), problem.question)
            yield dataclasses.replace(problem, question=question, correct=letter)
