"""Chat rendering: ids and loss mask token by token, as nanochat's render_conversation."""

import pytest

from aquainterp.tokenizer import Tokenizer

CORPUS = ["What is 12 + 30? A) 40 B) 42 C) 44 D) 46 E) 48", "Answer: B", "12 + 30 = 42, so the answer is B."] * 20


@pytest.fixture(scope="module")
def tok():
    with pytest.warns(UserWarning, match="ran out of pairs"):  # a tiny corpus, so a small vocabulary
        return Tokenizer.train_from_iterator(CORPUS, 512)


def S(tok, name):
    return tok.encode_special(name)


def test_mask_token_by_token(tok):
    user, reply = "What is 12 + 30?", "12 + 30 = 42\nAnswer: B"
    conv = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]}
    ids, mask = tok.render_conversation(conv)
    # Build the expectation piece by piece: (tokens, mask value).
    pieces = [
        ([S(tok, "<|bos|>")], 0),
        ([S(tok, "<|user_start|>")], 0), (tok.encode(user), 0), ([S(tok, "<|user_end|>")], 0),
        ([S(tok, "<|assistant_start|>")], 0), (tok.encode(reply), 1), ([S(tok, "<|assistant_end|>")], 1),
        ([S(tok, "<|user_start|>")], 0), (tok.encode("Sure?"), 0), ([S(tok, "<|user_end|>")], 0),
        ([S(tok, "<|assistant_start|>")], 0), (tok.encode("Yes"), 1), ([S(tok, "<|assistant_end|>")], 1),
    ]
    expected_ids = [t for toks, _ in pieces for t in toks]
    expected_mask = [m for toks, m in pieces for _ in toks]
    assert len(ids) == len(mask) == len(expected_ids)
    for pos, (t, m, et, em) in enumerate(zip(ids, mask, expected_ids, expected_mask)):
        assert (t, m) == (et, em), f"position {pos}: got ({tok.token_str(t)!r}, {m}), expected ({tok.token_str(et)!r}, {em})"
    # What the loss trains on is exactly the assistant text and its end token.
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == reply + "<|assistant_end|>" + "Yes" + "<|assistant_end|>"
    assert tok.decode(ids) == (f"<|bos|><|user_start|>{user}<|user_end|><|assistant_start|>{reply}"
                               "<|assistant_end|><|user_start|>Sure?<|user_end|><|assistant_start|>Yes<|assistant_end|>")


def test_system_message_merged_into_first_user(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "B"}]}
    ids, mask = tok.render_conversation(conv)
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "B"}]}
    assert (ids, mask) == tok.render_conversation(merged)
    assert conv["messages"][0]["role"] == "system"  # input not modified


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42 " * 50}]}
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])
    assert len(full_ids) > 10


def test_tool_parts_mask(tok):
    parts = [{"type": "text", "text": "Compute:"}, {"type": "python", "text": "12+30"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": "B"}]
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "Q"},
                                                      {"role": "assistant", "content": parts}]})
    start = ids.index(S(tok, "<|assistant_start|>")) + 1
    expected = ([(t, 1) for t in tok.encode("Compute:")]
                + [(t, 1) for t in [S(tok, "<|python_start|>"), *tok.encode("12+30"), S(tok, "<|python_end|>")]]
                + [(t, 0) for t in [S(tok, "<|output_start|>"), *tok.encode("42"), S(tok, "<|output_end|>")]]
                + [(t, 1) for t in tok.encode("B")] + [(S(tok, "<|assistant_end|>"), 1)])
    assert list(zip(ids[start:], mask[start:])) == expected


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "Answer: B"}]}
    prompt = tok.render_for_completion(conv)
    assert prompt == [S(tok, "<|bos|>"), S(tok, "<|user_start|>"), *tok.encode("What is 12 + 30?"),
                      S(tok, "<|user_end|>"), S(tok, "<|assistant_start|>")]
    ids, _ = tok.render_conversation(conv)
    assert ids[: len(prompt)] == prompt
    # A conversation ending with the user gets the same prompt.
    assert tok.render_for_completion({"messages": conv["messages"][:1]}) == prompt


@pytest.mark.parametrize("conv, message", [
    ({}, "must be a dict with a 'messages' list"),
    ({"messages": []}, "no messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "message 0 has role 'assistant', expected 'user'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
     "message 1 has role 'user', expected 'assistant'"),
    ({"messages": [{"role": "user"}]}, "message 0 must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "system", "content": "s"}]}, "system message must be followed by a user message"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 0: user content must be str"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "sql", "text": ""}]}]},
     "message 1 part 0 must be"),
])
def test_bad_conversations(tok, conv, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        tok.render_conversation(conv)
