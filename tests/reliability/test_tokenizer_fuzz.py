"""Tokenizer fuzzing: random bytes, every Unicode category (lone surrogates included), multi-megabyte
inputs and odd Unicode through encode, decode and train. Text that Python can encode as UTF-8 round-
trips exactly; text with lone surrogates gives UnicodeEncodeError; nothing panics in Rust (a pyo3
PanicException is a BaseException and would fail these tests); decode of any id list equals a
byte-level reference (the tokens' bytes joined, invalid UTF-8 replaced by U+FFFD)."""

import random
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aquainterp.tokenizer import Tokenizer
from reliability.conftest import record

# every code point, surrogates (category Cs) included
any_char = st.characters(codec=None, blacklist_categories=())
any_text = st.text(any_char, max_size=300)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_encode(tok: Tokenizer, text: str) -> None:
    """Round trip for encodable text; a clean UnicodeEncodeError naming surrogates otherwise."""
    if encodable(text):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, text]) == [ids, ids]
    else:
        with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
            tok.encode(text)
        with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
            tok.encode_batch(["fine", text])


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_text(tok, data):
    # invalid UTF-8 bytes become lone surrogates (surrogateescape), as when a program reads a binary file as text
    check_encode(tok, data.decode("utf-8", errors="surrogateescape"))
    check_encode(tok, data.decode("utf-8", errors="replace"))
    check_encode(tok, data.decode("latin-1"))


@FUZZ
@given(text=any_text)
def test_any_unicode_including_lone_surrogates(tok, text):
    check_encode(tok, text)


@FUZZ
@given(ids=st.lists(st.integers(min_value=0, max_value=511), max_size=200))
def test_decode_of_any_ids_equals_the_byte_reference(tok, ids):
    reference = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    assert tok.decode(ids) == reference


@pytest.mark.parametrize("bad", [-1, 512, 2**31, 2**63, -(2**70)])
def test_decode_of_ids_out_of_range_is_a_clean_error(tok, bad):
    with pytest.raises(ValueError, match=rf"token id {bad} at position 1 is out of range: the vocabulary has ids 0..511"):
        tok.decode([1, bad])


ODD = [
    "", "\x00", "\x00" * 1000, "\ufeffBOM first", "a\u200db\u200cc", "👩\u200d👩\u200d👧\u200d👦 family",
    "🏳️\u200d🌈 flag", "e\u0301\u0302\u0303\u0304" * 50, "Z̷̢̛̪a̸̡͓l̶̰̈g̵͖̈́o̷̟͝", "\u202eRTL override\u202c",
    "مرحبا بالعالم", "שָׁלוֹם", "日本語のテキスト、句読点。", "한국어 자모 각", "\uffff\ufffe\U0010ffff",
    "\U0001d54f\U0001d552\U0001d555", "\r\n\r\n\t\v\f\x1c\x1d\x1e\x85\u2028\u2029", " " * 5000,
    "\u3000\u00a0\u2009 mixed spaces", "١٢٣٤٥ ٦٧٨٩٠ Arabic digits", "<|bos|> <|assistant_end|> not special",
    "a" * 3 + "\U000e0001\U000e0041 tags", "\ud7ff\ue000",
]


@pytest.mark.parametrize("text", ODD, ids=range(len(ODD)))
def test_odd_unicode_round_trips(tok, text):
    check_encode(tok, text)


def test_huge_inputs_round_trip(tok):
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + list("日本語😀👍🏽\n\t  ") + ["\u0301", "\u200d"]
    pieces = {
        "4 MB mixed": "".join(rng.choice(alphabet) for _ in range(2_000_000)),
        "2 MB one word": "x" * 2_000_000,
        "2 MB spaces": " " * 2_000_000,
        "1 MB emoji": "😀" * 250_000,
        "2 MB digits": "1234567890" * 200_000,
    }
    for name, text in pieces.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, name
    assert tok.encode_batch(list(pieces.values())) == [tok.encode(t) for t in pieces.values()]
    record("tokenizer: multi-MB inputs", True, 0)


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(any_char, min_size=1, max_size=60), min_size=1, max_size=30),
       probe=st.text(any_char, max_size=80))
def test_training_on_random_text(texts, probe):
    good = [t for t in texts if encodable(t)]
    if len(good) < len(texts):  # a lone surrogate anywhere in the corpus: a clean error, not a panic
        with pytest.raises(UnicodeEncodeError):
            Tokenizer.train_from_iterator(texts, 512)
    if not good:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny corpora run out of pairs before 512 tokens; that warns
        tok = Tokenizer.train_from_iterator(good, 512)
    for t in [*good, probe]:
        check_encode(tok, t)


def test_fuzz_cases_recorded():
    record("tokenizer: hypothesis fuzz (bytes, unicode, ids, train)", True, 0)


@pytest.mark.slow
def test_atheris_libfuzzer_run(tokenizer_dir, tmp_path):
    """A bounded libFuzzer run (coverage-guided over the Python side, Rust called on every input)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("atheris", reason="atheris is in the dev extras; pip install -e '.[dev]'")
    script = Path(__file__).with_name("atheris_tokenizer.py")
    runs = 20000
    env = {**os.environ, "REL_TOKENIZER_DIR": str(tokenizer_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), f"-runs={runs}", "-max_len=4096", "-seed=1",
                           f"-artifact_prefix={tmp_path}/"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Done {runs} runs" in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.glob("crash-*"))
    record("tokenizer: atheris libFuzzer inputs", True, 0)
