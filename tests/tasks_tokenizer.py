"""A real trained tokenizer for the tasks/evaluate tests.

aquainterp.tokenizer.Tokenizer when it is importable; until then the smallest real stand-in for its
docs/api.md contract: an HF `tokenizers` byte-level BPE with nanochat's split pattern and special
tokens, and nanochat's chat rendering. Trained on the synthetic corpus, so " A".." E" are single tokens.
"""

from __future__ import annotations

import functools

from aquainterp.tasks.synthetic import corpus

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
                 r"\s*[\r\n]|\s+(?!\S)|\s+")


class StandInTokenizer:
    def __init__(self, texts, vocab_size):
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.add_special_tokens(SPECIAL_TOKENS)
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos_token_id = self.encode_special("<|bos|>")

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_special(self, name):
        token = self._tok.token_to_id(name)
        if name not in SPECIAL_TOKENS or token is None:
            raise ValueError(f"unknown special token {name!r}")
        return token

    def render_for_completion(self, conversation):
        messages = conversation["messages"][:-1]
        ids = [self.bos_token_id]
        for message in messages:
            role = "user" if message["role"] == "user" else "assistant"
            ids += [self.encode_special(f"<|{role}_start|>"), *self.encode(message["content"]),
                    self.encode_special(f"<|{role}_end|>")]
        return ids + [self.encode_special("<|assistant_start|>")]


@functools.cache
def trained_tokenizer(vocab_size: int = 700):
    texts = list(corpus(1500, seed=123))
    try:
        from aquainterp.tokenizer import Tokenizer
    except ImportError:
        return StandInTokenizer(texts, vocab_size)
    return Tokenizer.train_from_iterator(texts, vocab_size=vocab_size)
