"""Multiple-choice problems as chat conversations, and the token positions the evals and probes read.

Two styles, one user layout (question, then the options one per line as "A) text", then one short
fixed instruction line):
- "direct": the assistant says exactly "Answer: C". Categorical eval and the probes read the model's
  next-token logits right after "Answer:", so the decision is one token.
- "reasoning": the assistant writes the rationale, then "\\nAnswer: C". Generative eval and RL sample
  this and read the letter back with extract_letter.
SFT mixes both styles.
- "checked": the "reasoning" user message; the assistant writes the rationale, then checks the options in
  order against the rationale's final value ("A) 5 no", "B) 8 no", ... up to "D) 6 yes"), then
  "\nAnswer: D". Why: with plain "reasoning" targets a depth-2 GPT (4 heads) learned the arithmetic
  but stayed at chance on the letter after 800-1250 CPU steps; with checked targets (all five lines)
  it reached 0.62-0.75 generative accuracy in 800 steps in two runs, but one run learned to answer the
  letter of the line AFTER "yes" (~0.02); stopping at the match puts the letter right above
  "Answer:" (this form: 0.74 on 100 held-out problems after 800 steps, one run, difficulty 1;
  categorical accuracy stayed at chance in every run). Falls back to "reasoning" when the final value is not exactly one option's text (most
  AQuA rows). Generation prompts are the same for "reasoning" and "checked".
"""

from __future__ import annotations

from aquainterp.tasks.problem import LETTERS, MCProblem

INSTRUCTIONS = {
    "direct": "Reply with the letter of the correct option.",
    "reasoning": "Work it out step by step, then give the letter.",
}
INSTRUCTIONS["checked"] = INSTRUCTIONS["reasoning"]
STYLES = tuple(INSTRUCTIONS)  # ("direct", "reasoning", "checked")
ANSWER_PREFIX = "Answer:"


def option_lines(problem: MCProblem) -> list[str]:
    return [f"{letter}) {text}" for letter, text in zip(LETTERS, problem.options)]


def user_message(problem: MCProblem, style: str) -> str:
    if style not in INSTRUCTIONS:
        raise ValueError(f"conversation style must be one of {tuple(INSTRUCTIONS)}, got {style!r}")
    return "\n".join([problem.question, *option_lines(problem), INSTRUCTIONS[style]])


def option_check(problem: MCProblem) -> str | None:
    """Lines "X) text no" for the options before the match, then "X) text yes" for the option equal to
    the rationale's final value ("... = 6"); None when that value is not exactly one option, the gold."""
    last = problem.rationale.rstrip().splitlines()[-1] if problem.rationale.strip() else ""
    value = last.rsplit("=", 1)[-1].strip() if "=" in last else None
    if value is None or [o.strip() for o in problem.options].count(value) != 1 or problem.answer_text.strip() != value:
        return None
    checks = []
    for line, text in zip(option_lines(problem), problem.options):
        checks.append(f"{line} {'yes' if text.strip() == value else 'no'}")
        if text.strip() == value:  # stop at the match: "Answer: X" then sits right under "X) ... yes"
            break
    return "\n".join(checks)


def conversation(problem: MCProblem, style: str) -> dict:
    """The chat for one problem: {"messages": [user, assistant]} in the given style."""
    user = user_message(problem, style)
    answer = f"{ANSWER_PREFIX} {problem.correct}"
    check = option_check(problem) if style == "checked" else None
    if style == "direct":
        assistant = answer
    elif check is not None:
        assistant = f"{problem.rationale}\n{check}\n{answer}"
    else:
        assistant = f"{problem.rationale}\n{answer}"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def letter_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(tokens appended after "Answer:" in the prompt, the five letter tokens) in the rendered context.

    The letters are what the tokenizer produces for "Answer: X" minus the tokens of "Answer:", so
    they match the SFT targets token for token. A token shared by all five (a lone space) moves into
    the prompt. Raises ValueError if a letter is still not exactly one token.
    """
    prefix = tokenizer.encode(ANSWER_PREFIX)
    tails = []
    for letter in LETTERS:
        full = tokenizer.encode(f"{ANSWER_PREFIX} {letter}")
        if full[: len(prefix)] != prefix:
            raise ValueError(f"tokenizer merges across '{ANSWER_PREFIX}' in '{ANSWER_PREFIX} {letter}': "
                             f"{full} does not start with {prefix}")
        tails.append(full[len(prefix) :])
    shared = []
    while all(len(t) > 1 for t in tails) and len({t[0] for t in tails}) == 1:
        shared.append(tails[0][0])
        tails = [t[1:] for t in tails]
    for letter, tail in zip(LETTERS, tails):
        if len(tail) != 1:
            raise ValueError(f"option letter {letter!r} after '{ANSWER_PREFIX}' is {len(tail)} tokens "
                             f"{tail}, not one; the tokenizer needs ' {letter}' as a single token")
    letters = [t[0] for t in tails]
    if len(set(letters)) != len(LETTERS):
        raise ValueError(f"option letters do not map to five distinct tokens: {letters}")
    return prefix + shared, letters


def decision_prompt(tokenizer, problem: MCProblem) -> tuple[list[int], list[int]]:
    """(ids up to the decision position, the five letter token ids): the next token is the answer."""
    answer_ids, letters = letter_token_ids(tokenizer)
    ids = tokenizer.render_for_completion(conversation(problem, "direct"))
    return ids + answer_ids, letters


def reasoning_decision_prompt(tokenizer, problem: MCProblem, style: str = "reasoning") -> tuple[list[int], list[int]]:
    """Like decision_prompt, after the worked rationale: the "reasoning" conversation up to
    "...rationale\nAnswer:", so the letter is read where a reasoning model commits to it. Style "checked"
    also keeps the option checks ("A) 5 no", ..., "C) 21 yes") that a model trained on the checked style
    writes before its answer (plain reasoning where the problem has none, as conversation does).
    Activation patching cuts its reasoning pairs here; the prompt is this module's chat format."""
    answer_ids, letters = letter_token_ids(tokenizer)
    check = option_check(problem) if style == "checked" else None
    text = problem.rationale if check is None else f"{problem.rationale}\n{check}"
    head = tokenizer.render_for_completion(conversation(problem, style))
    said = tokenizer.encode(f"{text}\n{ANSWER_PREFIX}")
    whole = tokenizer.encode(f"{text}\n{ANSWER_PREFIX} {problem.correct}")
    if whole[: len(said)] != said:
        raise ValueError(f"pair {problem.source}: the {style} answer and '{ANSWER_PREFIX}' tokenise differently "
                         "inside the full answer; cannot cut the prompt at the decision position")
    return head + said + answer_ids[len(tokenizer.encode(ANSWER_PREFIX)):], letters


def generation_prompt(tokenizer, problem: MCProblem, style: str = "reasoning") -> list[int]:
    """The conversation of `style` rendered up to the assistant's turn: the prompt a completion continues."""
    return list(tokenizer.render_for_completion(conversation(problem, style)))


def answer_step(completion: list[int], marker: list[int]) -> int | None:
    """How many tokens of `completion` to keep so that its next token is the stated letter: the end of
    the LAST answer marker in it (the marker ids are `letter_token_ids(tokenizer)[0]`, "Answer:" plus
    any token shared by all five letters), or None when the completion never writes the marker.

    The last one, because extract_letter also reads the last answer statement. Matched on token ids:
    a completion that spells the marker with other tokens has no answer step here (it is counted, not
    guessed), although extract_letter may still read a letter from its text."""
    if not marker:
        raise ValueError("answer_step: the answer marker has no tokens")
    n = len(marker)
    for start in range(len(completion) - n, -1, -1):
        if completion[start : start + n] == marker:
            return start + n
    return None


def option_spans(tokenizer, problem: MCProblem, style: str = "direct") -> tuple[list[int], list[tuple[int, int]]]:
    """Prompt ids and, for A..E, the [start, end) token span of the line "X) text" in them.

    style "direct": the ids are the decision prompt (decision_prompt). Any other style: the ids are the
    generation prompt of that style (the conversation rendered up to the assistant's turn), the
    prompt a reasoning completion continues.

    Spans come from the tokenizer's character offsets of the user message: a span holds every token
    that overlaps the line's characters. Guarantee: decoding ids[start:end] gives the option line
    with at most whitespace (the surrounding newlines) added at either end; this holds for
    tokenizers whose pre-split never glues a non-space character across a newline (GPT-4 style).
    """
    if style == "direct":
        ids, _ = decision_prompt(tokenizer, problem)
    else:
        ids = generation_prompt(tokenizer, problem, style)
    user = user_message(problem, style)
    user_ids, offsets = tokenizer.encode_with_offsets(user)
    start_token = tokenizer.encode_special("<|user_start|>")
    if start_token not in ids:
        raise ValueError("option_spans: no <|user_start|> token in the rendered prompt")
    base = ids.index(start_token) + 1
    if ids[base : base + len(user_ids)] != user_ids:
        raise ValueError("option_spans: the user message is not tokenized the same inside the rendered "
                         "conversation as on its own; cannot map character offsets to prompt positions")
    spans = []
    line_start = len(problem.question) + 1
    for line in option_lines(problem):
        line_end = line_start + len(line)
        inside = [i for i, (s, e) in enumerate(offsets) if s < line_end and e > line_start]
        spans.append((base + inside[0], base + inside[-1] + 1))
        line_start = line_end + 1
    return ids, spans


def question_span(tokenizer, problem: MCProblem, ids: list[int], style: str = "direct",
                  with_options: bool = False) -> tuple[int, int]:
    """[start, end) of the user's question in `ids`, a prompt of `style` (direct: a decision prompt, possibly
    continued after the rationale; other styles: a generation prompt): after the last <|user_start|>, before
    option A (with_options: up to the end of option E). What activation patching's noise corruption blurs."""
    prompt, spans = option_spans(tokenizer, problem, style)
    user_start = tokenizer.encode_special("<|user_start|>")
    starts = [i for i, t in enumerate(ids) if t == user_start]
    if not starts or list(prompt[: spans[-1][1]]) != list(ids[: spans[-1][1]]):
        kind = "decision" if style == "direct" else "generation"
        raise ValueError(f"pair {problem.source}: cannot find the question tokens (no <|user_start|> "
                         f"or option spans that disagree with the {kind} prompt)")
    start, end = starts[-1] + 1, spans[-1][1] if with_options else spans[0][0]
    if end <= start:
        raise ValueError(f"pair {problem.source}: option A starts at token {end}, before the question "
                         f"at {start}")
    return start, end
