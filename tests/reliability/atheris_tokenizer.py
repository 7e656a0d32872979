"""libFuzzer (atheris) target for the tokenizer; tests/reliability/test_tokenizer_fuzz.py runs it briefly.

    REL_TOKENIZER_DIR=runs/tokenizer python tests/reliability/atheris_tokenizer.py -runs=20000 -max_len=4096

Each input is split into a text (possibly with lone surrogates) and a list of token ids. The text must
round-trip through encode/decode or give UnicodeEncodeError; any ids must decode (ValueError for ids
out of range). Anything else, a Rust panic included, is a crash that libFuzzer reports and saves.
"""

import os
import sys

import atheris

with atheris.instrument_imports():
    from aquainterp.tokenizer import Tokenizer

TOK = Tokenizer.load(os.environ["REL_TOKENIZER_DIR"])


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 2048))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            TOK.encode(text)
        except UnicodeEncodeError:
            pass
        else:
            raise AssertionError(f"encode accepted text with a lone surrogate: {text!r:.200}")
    else:
        ids = TOK.encode(text)
        if TOK.decode(ids) != text:
            raise AssertionError(f"round trip failed for {text!r:.200}")
    ids = [fdp.ConsumeIntInRange(-2, TOK.vocab_size + 2) for _ in range(fdp.ConsumeIntInRange(0, 64))]
    try:
        TOK.decode(ids)
    except ValueError:
        if all(0 <= i < TOK.vocab_size for i in ids):
            raise


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
