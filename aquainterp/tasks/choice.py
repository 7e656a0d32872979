"""Lettered multiple-choice tasks as nanochat evaluates them (ARC, MMLU): the record, the prompt, the letters.

nanochat (tasks/common.py render_mc, scripts/chat_eval.py run_categorical_eval) asks

    Multiple Choice question: <question>
    - <choice 1>=A
    - <choice 2>=B
    ...

    Respond only with the letter of the correct answer.

as the user message, renders the conversation up to <|assistant_start|> and reads the next-token logits
there, restricted to the tokens of the problem's own letters (each letter encoded alone, no leading space:
"A", not " A"); the argmax among them is the answer. The letter comes after its choice and right after "=",
so the prompt holds the very token the answer is. ARC rows carry their own labels (usually A-D, some
A-C, A-E or 1-4); MMLU always has A-D.

This layout is nanochat's, not the AQuA one of tasks.chat (options "A) text", answer "Answer: C"): a model
SFT-trained by nanochat answers in this one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChoiceProblem:
    """A question with 2+ choices, each with its label (letters), and the gold label. `source` names the row
    ("path:line" or "hub_id:split:index"), `subject` the MMLU subject ("" for ARC)."""

    question: str
    choices: tuple[str, ...]
    letters: tuple[str, ...]
    answer: str
    source: str
    subject: str = ""

    def __post_init__(self):
        if len(self.choices) != len(self.letters) or len(self.choices) < 2:
            raise ValueError(f"{self.source}: {len(self.choices)} choices for {len(self.letters)} labels")
        if len(set(self.letters)) != len(self.letters):
            raise ValueError(f"{self.source}: labels repeat: {self.letters}")
        if self.answer not in self.letters:
            raise ValueError(f"{self.source}: answer {self.answer!r} is not one of the labels {self.letters}")


def user_message(problem: ChoiceProblem) -> str:
    """nanochat's render_mc: the question, each choice followed by '=' and its letter, the instruction."""
    lines = [f"Multiple Choice question: {problem.question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(problem.letters, problem.choices)]
    return "".join(lines) + "\nRespond only with the letter of the correct answer."


def conversation(problem: ChoiceProblem) -> dict:
    """{"messages": [user, assistant]}: the assistant answers with the bare letter."""
    return {"messages": [{"role": "user", "content": user_message(problem)},
                         {"role": "assistant", "content": problem.answer}]}


def letter_ids(tokenizer, letters) -> list[int]:
    """The token of each letter encoded alone; ValueError naming the letter when one is not a single token."""
    out = []
    for letter in letters:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise ValueError(f"answer label {letter!r} is {len(ids)} tokens {ids} in this tokenizer, not one; "
                             "categorical scoring reads one token per label")
        out.append(ids[0])
    return out


def decision_prompt(tokenizer, problem: ChoiceProblem) -> tuple[list[int], list[int]]:
    """(prompt ids ending in <|assistant_start|>, the label token ids): the next token is the answer."""
    return list(tokenizer.render_for_completion(conversation(problem))), letter_ids(tokenizer, problem.letters)
