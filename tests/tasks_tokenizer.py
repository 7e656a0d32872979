"""A real tokenizer trained on the synthetic corpus, shared by the tasks/evaluate tests (cached)."""

from __future__ import annotations

import functools
import warnings

from aquainterp.tasks.synthetic import corpus
from aquainterp.tokenizer import Tokenizer


def train(texts: list[str], vocab_size: int = 512) -> Tokenizer:
    """Tokenizer.train_from_iterator, quiet about small corpora running out of merges."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        return Tokenizer.train_from_iterator(texts, vocab_size=vocab_size)


@functools.cache
def trained_tokenizer() -> Tokenizer:
    """~525 tokens: " A".." E", the option lines and the chat specials are all in it."""
    return train(list(corpus(1500, seed=123)), vocab_size=700)
