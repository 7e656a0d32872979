"""The exported tokenizer.json, loaded by HF `tokenizers`, gives exactly our ids."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import TRICKY
from tokenizers import Tokenizer as HFTokenizer

from aquainterp.tokenizer import SPECIAL_TOKENS, Tokenizer


def read_jsonl(path, fields):
    texts = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for f in fields:
            texts.extend(row[f] if isinstance(row[f], list) else [row[f]])
    return texts


@pytest.fixture(scope="module")
def gsm8k_train(shared_data):
    return read_jsonl(shared_data / "gsm8k" / "train.jsonl", ["question", "answer"])


@pytest.fixture(scope="module")
def aqua_dev(shared_data):
    return read_jsonl(shared_data / "aqua_rat" / "dev.json", ["question", "options", "rationale"])


@pytest.fixture(scope="module")
def tok_and_hf(gsm8k_train, tmp_path_factory):
    tok = Tokenizer.train_from_iterator(gsm8k_train, 4096)
    directory = tmp_path_factory.mktemp("tok")
    tok.save(directory)
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    return tok, hf


def hf_ids(hf, texts):
    return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


def test_hf_ids_equal_ours_on_gsm8k_train(tok_and_hf, gsm8k_train):
    tok, hf = tok_and_hf
    ours = tok.encode_batch(gsm8k_train)
    theirs = hf_ids(hf, gsm8k_train)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {gsm8k_train[mismatches[0]]!r}"
    assert sum(map(len, ours)) > 1_000_000  # really the whole split


def test_hf_ids_equal_ours_on_aqua_dev(tok_and_hf, aqua_dev):
    tok, hf = tok_and_hf
    assert tok.encode_batch(aqua_dev) == hf_ids(hf, aqua_dev)
    assert [hf.decode(ids) for ids in hf_ids(hf, aqua_dev[:100])] == aqua_dev[:100]


def test_hf_vocab_and_special_tokens(tok_and_hf):
    tok, hf = tok_and_hf
    assert hf.get_vocab_size() == tok.vocab_size == 4096
    for name in SPECIAL_TOKENS:
        assert hf.token_to_id(name) == tok.encode_special(name)
    assert hf.id_to_token(ord(" ")) == "Ġ"  # GPT-2 byte-level mapping
    assert hf.decode([tok.bos_token_id, *tok.encode("x")], skip_special_tokens=False) == "<|bos|>x"


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.lists(st.sampled_from(TRICKY), max_size=40).map("".join),
                 st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<", exclude_categories=["Cn"]),
                         max_size=200)))
def test_hf_ids_equal_ours_on_random_text(tok_and_hf, text):
    # "<" excluded: HF matches added-token strings such as "<|bos|>" in text, ours never does.
    # Unassigned (by Python's Unicode 14 table) characters excluded: see test_tokenizer.assigned_text.
    tok, hf = tok_and_hf
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_runtime_hf_tokenizer_keeps_special_strings_ordinary(tok_and_hf):
    tok, _ = tok_and_hf
    hf = tok.hf_tokenizer()
    text = "say <|bos|> and <|assistant_end|> literally"
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)


@pytest.mark.slow
def test_hf_ids_equal_ours_at_16384(gsm8k_train, aqua_dev, shared_data, tmp_path):
    tok = Tokenizer.train_from_iterator(gsm8k_train, 16384)
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = aqua_dev + read_jsonl(shared_data / "gsm8k" / "test.jsonl", ["question", "answer"])
    assert tok.encode_batch(texts) == hf_ids(hf, texts)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TRICKY + ["  ", "\u00a0", "\u3000", "\u0085", "\u2028"]), max_size=30).map("".join))
def test_split_equals_hf_split(text):
    from tokenizers import Regex, pre_tokenizers

    from aquainterp import _rustbpe
    from aquainterp.tokenizer import SPLIT_PATTERN

    hf_split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    assert _rustbpe.split_text(text) == [piece for piece, _ in hf_split.pre_tokenize_str(text)]
