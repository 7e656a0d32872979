"""Chat rendering, decision prompts and option spans, with a real trained tokenizer."""

import pytest
from tasks_tokenizer import train, trained_tokenizer

from aquainterp.tasks import LETTERS, MCProblem, conversation, decision_prompt, extract_letter, option_spans
from aquainterp.tasks.aqua import load_aqua
from aquainterp.tasks.chat import letter_token_ids
from aquainterp.tasks.synthetic import SyntheticTask

PROBLEM = MCProblem("What is 2 + 3?", ("4", "5", "6", "7", "8"), "2 + 3 = 5", "B", "test:1")


def test_conversation_styles():
    direct = conversation(PROBLEM, "direct")["messages"]
    reasoning = conversation(PROBLEM, "reasoning")["messages"]
    assert [m["role"] for m in direct] == ["user", "assistant"]
    assert direct[0]["content"] == ("What is 2 + 3?\nA) 4\nB) 5\nC) 6\nD) 7\nE) 8\n"
                                    "Reply with the letter of the correct option.")
    assert direct[1]["content"] == "Answer: B"
    assert reasoning[0]["content"].endswith("\nE) 8\nWork it out step by step, then give the letter.")
    assert reasoning[1]["content"] == "2 + 3 = 5\nAnswer: B"
    for messages in (direct, reasoning):
        assert extract_letter(messages[1]["content"]) == "B"
    with pytest.raises(ValueError, match="style must be one of .*got 'cot'"):
        conversation(PROBLEM, "cot")


def test_aqua_reasoning_target_ends_with_the_gold_letter(shared_data):
    for p in load_aqua(shared_data / "aqua_rat" / "dev.json"):
        target = conversation(p, "reasoning")["messages"][1]["content"]
        assert target.endswith(f"\nAnswer: {p.correct}") and extract_letter(target) == p.correct


def test_decision_prompt_matches_the_sft_rendering():
    tok = trained_tokenizer()
    for p in SyntheticTask(0, "eval").problems(20) + [PROBLEM]:
        ids, letters = decision_prompt(tok, p)
        assert len(letters) == 5 and len(set(letters)) == 5
        assert [tok.decode([t]).strip() for t in letters] == list(LETTERS)
        # prompt + gold letter token == the completion prompt followed by the direct answer's tokens
        completion = tok.render_for_completion(conversation(p, "direct"))
        assert ids[: len(completion)] == completion
        assert ids[len(completion):] + [letters[p.answer_index]] == tok.encode(f"Answer: {p.correct}")
        assert tok.decode(ids).endswith("<|assistant_start|>Answer:")


def test_shared_space_token_moves_into_the_prompt():
    """A tokenizer that never merged " X": the space is shared by all five and goes into the prompt."""
    tok = train(["Answer:A Answer:B Answer:C Answer:D Answer:E xyz"] * 50)
    prompt_tail, letters = letter_token_ids(tok)
    assert tok.decode(prompt_tail) == "Answer: "
    assert [tok.decode([t]) for t in letters] == list(LETTERS)


def test_letter_that_is_not_one_token_is_an_error():
    # " A".." D" become tokens, " E" stays space + letter: no single-token letter for E
    tok = train(["Answer: A Answer: B Answer: C Answer: D xyzE"] * 50)
    assert len(tok.encode(" E")) == 2
    with pytest.raises(ValueError, match=r"option letter 'E' after 'Answer:' is 2 tokens"):
        decision_prompt(tok, PROBLEM)


def _check_spans(tok, problem):
    ids, spans = option_spans(tok, problem)
    assert ids == decision_prompt(tok, problem)[0]
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    for (start, end), letter, text in zip(spans, LETTERS, problem.options):
        line = f"{letter}) {text}"
        decoded = tok.decode(ids[start:end])
        # the guarantee: the option line, plus at most whitespace from tokens straddling its ends
        assert decoded.strip() == line.strip(), (decoded, line)
        assert line.strip() in decoded
        # minimal: dropping the first or last token loses part of the line
        assert line.strip() not in tok.decode(ids[start + 1 : end])
        assert line.strip() not in tok.decode(ids[start : end - 1])


def test_option_spans_on_synthetic_and_all_aqua_dev(shared_data):
    tok = trained_tokenizer()
    for p in SyntheticTask(1, "eval").problems(30):
        _check_spans(tok, p)
    for p in load_aqua(shared_data / "aqua_rat" / "dev.json"):
        _check_spans(tok, p)


def test_checked_style_walks_the_options():
    checked = conversation(PROBLEM, "checked")["messages"]
    assert checked[0]["content"] == conversation(PROBLEM, "reasoning")["messages"][0]["content"]
    assert checked[1]["content"] == "2 + 3 = 5\nA) 4 no\nB) 5 yes\nAnswer: B"
    for p in SyntheticTask(0, "train").problems(200):
        content = conversation(p, "checked")["messages"][1]["content"]
        assert content.count(" yes\n") == 1 and content.endswith(f"\n{p.correct}) {p.answer_text} yes\nAnswer: {p.correct}")
        assert content.count(" no\n") == p.answer_index
        assert extract_letter(content) == p.correct


def test_checked_style_falls_back_when_the_value_is_not_one_option(shared_data):
    fallback = 0
    for p in load_aqua(shared_data / "aqua_rat" / "dev.json"):
        checked = conversation(p, "checked")["messages"][1]["content"]
        fallback += checked == conversation(p, "reasoning")["messages"][1]["content"]
        assert extract_letter(checked) == p.correct
    assert fallback > 200  # AQuA rationales rarely end in "= <exact option text>"
    odd = MCProblem("q", ("5", "5", "6", "7", "8"), "2 + 3 = 5", "A", "t:2")  # 5 is two options
    assert conversation(odd, "checked")["messages"][1]["content"] == "2 + 3 = 5\nAnswer: A"
