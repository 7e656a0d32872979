"""nanochat's tokenizer.pkl: read through a restricted unpickler (nothing but tiktoken's Encoding state is
constructed; anything else is refused before it runs), rebuilt with nanochat's ids, and written back."""

from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path

import pytest

from aquainterp.checkpoints.nanochat_tokenizer import (
    NanochatTokenizerError,
    load_nanochat_tokenizer,
    read_encoding_state,
    tokenizer_from_encoding_state,
    write_tokenizer_pkl,
)

FIXTURE = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures")
               ) / "nanochat" / "nanochat-head-d4" / "tokenizer" / "tokenizer.pkl"


def fixture_state() -> dict:
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} not found (set AQUAINTERP_SHARED_FIXTURES)")
    return read_encoding_state(FIXTURE)


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def encoding_pickle(state) -> bytes:
    """A pickle of Encoding(state) the way pickle itself writes one (GLOBAL, NEWOBJ, BUILD)."""
    body = pickle.dumps(state, protocol=3)
    return b"\x80\x04ctiktoken.core\nEncoding\n)\x81" + body[2:-1] + b"b."


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps(_Call(os.system, "touch PWNED")), r"refuses global (posix|os)\.system"),
    (pickle.dumps(_Call(eval, "__import__('os').system('touch PWNED')")), r"refuses global builtins\.eval"),
    (pickle.dumps({"not": "an encoding"}), "holds a dict"),
    (b"\x80\x04ctiktoken.core\nEncoding\n\x8c\x01x\x85R.", "truncated or corrupt"),  # Encoding("x") called
    (b"\x80\x02X\x01\x00\x00\x00aQ.", "refuses persistent ids"),
    (pickle.dumps(list(range(10)))[:9], "truncated"),
])
def test_hostile_or_broken_pickles_are_refused_without_running(tmp_path, monkeypatch, payload, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(payload)
    with pytest.raises(NanochatTokenizerError, match=message) as info:
        read_encoding_state(path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("special_tokens"), "Encoding state must have keys"),
    (lambda s: s["mergeable_ranks"].__setitem__(b"zz", "1"), "mergeable_ranks must map bytes to ints"),
    (lambda s: s.__setitem__("name", 3), "name and pat_str must be strings"),
])
def test_encoding_state_of_the_wrong_shape_is_refused(tmp_path, edit, message):
    state = fixture_state()
    edit(state)
    (tmp_path / "tokenizer.pkl").write_bytes(encoding_pickle(state))
    with pytest.raises(NanochatTokenizerError, match=message):
        read_encoding_state(tmp_path / "tokenizer.pkl")


def test_vocabularies_we_cannot_reproduce_are_refused():
    state = fixture_state()
    with pytest.raises(NanochatTokenizerError, match="split pattern"):
        tokenizer_from_encoding_state({**state, "pat_str": r"\w+"})
    with pytest.raises(NanochatTokenizerError, match="special tokens"):
        tokenizer_from_encoding_state({**state, "special_tokens": {"<|bos|>": 491}})
    ranks = dict(state["mergeable_ranks"])
    ranks[b"\x00\x01\x02"] = len(ranks)  # not a merge of two existing tokens
    with pytest.raises(NanochatTokenizerError, match="is not a merge of two lower-ranked tokens"):
        tokenizer_from_encoding_state({**state, "mergeable_ranks": ranks,
                                       "special_tokens": {k: v + 1 for k, v in state["special_tokens"].items()}})


def test_written_pickle_holds_one_global_and_reads_back(tmp_path):
    tokenizer = load_nanochat_tokenizer(FIXTURE.parent)
    write_tokenizer_pkl(tokenizer, tmp_path)
    data = (tmp_path / "tokenizer.pkl").read_bytes()
    globals_ = [arg for op, arg, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL", "INST")]
    assert globals_ == ["tiktoken.core Encoding"]
    assert read_encoding_state(tmp_path / "tokenizer.pkl") == fixture_state()
    again = load_nanochat_tokenizer(tmp_path)
    text = "Mia has 7 bags of 3 cups. How many?\nA) 21 B) 4 ✓ 日本"
    assert again.encode(text) == tokenizer.encode(text)
