"""Pairs at the completion decision: prompt + the model's own completion, cut at its last answer marker."""

import pytest
import torch
from tasks_tokenizer import trained_tokenizer

from aquainterp.patching.completion_pairs import completion_pairs, greedy_completions
from aquainterp.patching.patcher import Patcher
from aquainterp.tasks import LETTERS, conversation, letter_token_ids
from aquainterp.tasks.synthetic import SyntheticTask


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return SyntheticTask(seed=0, split="eval", difficulty=1).problems(6)


def written(tok, problem, style="checked"):
    """What a model trained on `style` writes after the generation prompt (rendered by the tokenizer)."""
    prompt = tok.render_for_completion(conversation(problem, "reasoning"))
    full, _ = tok.render_conversation(conversation(problem, style))
    assert full[: len(prompt)] == prompt
    return full[len(prompt):]


def test_clean_and_corrupted_share_the_completion_cut_after_its_answer_marker(tok, problems):
    marker, letters = letter_token_ids(tok)
    completions = [written(tok, p) for p in problems]
    got = completion_pairs(tok, problems, "permute", completions, seed=2)
    assert got.no_marker == [] and got.unalignable == [] and len(got.pairs) == len(problems)
    for problem, completion, pair in zip(problems, completions, got.pairs):
        prompt = tok.render_for_completion(conversation(problem, "reasoning"))
        said = list(pair.clean_ids[pair.completion_start:])
        assert pair.completion_start == len(prompt) and list(pair.clean_ids[: len(prompt)]) == prompt
        assert said == completion[: len(said)] and said[-len(marker):] == marker
        assert completion[len(said)] == pair.stated_letter_id == letters[LETTERS.index(problem.correct)]
        assert pair.clean_letter_id == pair.stated_letter_id  # the rendered answer states the gold letter
        # the corrupted run: same completion, another prompt (gold option moved), same length
        assert list(pair.corrupted_ids[pair.completion_start:]) == said
        assert pair.corrupted_ids[: len(prompt)] != pair.clean_ids[: len(prompt)]
        moved = LETTERS[letters.index(pair.corrupted_letter_id)]
        bad = tok.decode(pair.corrupted_ids[: len(prompt)])
        assert f"\n{moved}) {problem.answer_text}\n" in bad and moved != problem.correct


def test_no_marker_is_skipped_and_counted_and_the_last_marker_wins(tok, problems):
    marker, _ = letter_token_ids(tok)
    first = written(tok, problems[0])
    twice = first[:-1] + tok.encode("\nAnswer: A\nok") + first[-1:]  # a second answer statement after the first
    none = tok.encode("I do not know.")
    got = completion_pairs(tok, problems[:3], "noise", [twice, none, written(tok, problems[2], "reasoning")])
    assert got.no_marker == [problems[1].source] and [p.name for p in got.pairs] == [problems[0].source,
                                                                                  problems[2].source]
    pair = got.pairs[0]
    assert tok.decode(pair.clean_ids[pair.completion_start:]).endswith(f"Answer: {problems[0].correct}\nAnswer:")
    assert pair.stated_letter_id == letter_token_ids(tok)[1][0]  # the last statement's letter, A
    assert pair.clean_ids == pair.corrupted_ids and pair.corrupted_letter_id is None
    start, end = pair.noise_span
    blurred = tok.decode(pair.clean_ids[start:end]).strip()
    assert blurred.startswith(problems[0].question) and blurred.endswith(f"E) {problems[0].options[4]}")
    assert got.completions[problems[1].source] == none


def test_completions_from_a_callable_and_errors(tok, problems):
    seen = []
    got = completion_pairs(tok, problems[:2], "noise", lambda prompts: seen.extend(prompts) or
                           [written(tok, p) for p in problems[:2]])
    assert len(got.pairs) == 2 and [len(s) for s in seen] == [p.completion_start for p in got.pairs]
    with pytest.raises(ValueError, match="'numbers' changes the question"):
        completion_pairs(tok, problems[:1], "numbers", [[]])
    with pytest.raises(ValueError, match="1 completions for 2 pairable problems"):
        completion_pairs(tok, problems[:2], "noise", [[]])


def test_greedy_completions_are_the_engines_and_patch(tok, problems):
    """On a random GPT the greedy completion is whatever the Engine decodes; a completion that happens to
    lack the marker is counted. With the marker forced into the completion the Patcher runs on the pairs."""
    from test_patching import random_gpt

    from aquainterp.model.engine import Engine

    model = random_gpt(n_layer=1, vocab=tok.vocab_size, seed=3)
    prompts = [tok.render_for_completion(conversation(p, "reasoning")) for p in problems[:2]]
    got = greedy_completions(model, tok, prompts, max_new_tokens=5, batch_size=1)
    stop = [tok.encode_special("<|assistant_end|>")]
    for prompt, completion in zip(prompts, got):
        alone = Engine(model).generate(prompt, max_new_tokens=5, temperature=0.0, stop_tokens=stop)
        assert completion == alone.completions[0]
    marker, _ = letter_token_ids(tok)
    forced = [c + marker for c in got]
    pairs = completion_pairs(tok, problems[:2], "noise", forced).pairs
    patcher = Patcher(model, pairs, batch_size=16, align="end", progress=False)
    # exact by construction: integer lengths
    assert torch.equal(patcher.lengths, torch.tensor([len(p) + len(c) for p, c in zip(prompts, forced)]))
    r = patcher.sweep("resid_pre")
    assert r.normalized.shape == (1, patcher.n_pos)
