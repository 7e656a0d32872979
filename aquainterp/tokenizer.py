"""The tokenizer: byte-level BPE trained by our Rust core (aquainterp._rustbpe), saved as an HF
`tokenizers` tokenizer.json, and nanochat's chat rendering (ids + loss mask).

Ids: 0..255 are the bytes, 256.. the merges in training order, then the 9 special tokens (nanochat's
order). Text is split by nanochat's GPT-4-style pattern before BPE. Training merges the most frequent
pair, ties going to the smallest (left id, right id) pair, so results never depend on thread count or
text order (benchmarks/tokenizer.py finds the same vocabulary as PyPI rustbpe on GSM8K). Special-token
strings inside ordinary text are encoded as ordinary text (as nanochat's encode_ordinary), so user text cannot forge
them. Encoding at runtime uses the Rust encoder: benchmarks/tokenizer.py measured it faster than HF
`tokenizers` loading the same tokenizer.json, which gives the same ids (tests/test_tokenizer_hf.py).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from tqdm import tqdm

from aquainterp import _rustbpe


def token_ids(ids) -> list[int]:
    """`ids` as a list of Python ints; TypeError naming the position of anything that is not an integer
    (a float, a bool, a string; a float or bool tensor/array)."""
    dtype = getattr(ids, "dtype", None)
    if dtype is not None and hasattr(ids, "tolist"):  # numpy array or torch tensor: check the dtype once
        kind = getattr(dtype, "kind", None)  # numpy
        if kind is None:
            kind = "b" if str(dtype) == "torch.bool" else "f" if getattr(dtype, "is_floating_point", False) \
                or getattr(dtype, "is_complex", False) else "i"
        if kind not in "iu":
            raise TypeError(f"token ids must be integers, got an array of {dtype}")
        ids = ids.tolist()
    out = []
    for pos, i in enumerate(ids):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"token id at position {pos} is {i!r} ({type(i).__name__}), not an integer")
        out.append(int(i))
    return out

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                  "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                  "<|output_start|>", "<|output_end|>"]
SPLIT_PATTERN = _rustbpe.SPLIT_PATTERN
TOKENIZER_FILE = "tokenizer.json"
# The special tokens a transformers tokenizer of ours names (Tokenizer.hf_pretrained_tokenizer; the HF export's
# tokenizer_config.json names the same): nanochat has no eos or pad token of its own.
HF_SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|assistant_end|>"}
assert list(_rustbpe.SPECIAL_TOKENS) == SPECIAL_TOKENS, "Rust core and Python disagree on special tokens"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which HF's ByteLevel pre-tokenizer applies to every byte:
    printable Latin-1 bytes map to themselves, the other 68 to chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _tokenizer_json(bpe: _rustbpe.Bpe) -> str:
    """The HF tokenizer.json for `bpe`: a BPE model over byte-level strings behind our split pattern,
    the ByteLevel decoder, and the special tokens as added tokens right after the vocabulary.
    Written by us (not by tokenizers' serializer) so its bytes, and so fingerprint(), depend only on
    the merges, never on the installed tokenizers version."""
    token_bytes = bpe.token_bytes()
    strings = [_byte_level(b) for b in token_bytes]
    n = len(strings)
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": n + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, name in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # False: a chunk that is itself a token must still be built by merges in rank order, as ours is.
            "ignore_merges": False,
            "vocab": {s: i for i, s in enumerate(strings)},
            "merges": [[strings[a], strings[b]] for a, b in bpe.merges],
        },
    }
    return json.dumps(spec, ensure_ascii=False, indent=1) + "\n"


def _bpe_from_tokenizer_json(text: str, where: str) -> _rustbpe.Bpe:
    """Rebuilds our Rust BPE from a tokenizer.json that _tokenizer_json wrote; errors name `where`."""
    try:
        spec = json.loads(text)
        model = spec["model"]
        vocab, merges, added = model["vocab"], model["merges"], spec["added_tokens"]
        pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{where}: not an aquainterp tokenizer.json ({type(e).__name__}: {e})") from e
    except RecursionError:  # a hostile file nested thousands deep: one line naming it, not a stack overflow
        raise ValueError(f"{where}: not an aquainterp tokenizer.json (its JSON is nested too deeply to "
                         "read)") from None
    if model.get("type") != "BPE" or pattern != SPLIT_PATTERN:
        raise ValueError(f"{where}: not an aquainterp tokenizer.json (model type {model.get('type')!r}, "
                         f"split pattern {pattern!r})")
    decode_char = {c: b for b, c in bytes_to_unicode().items()}
    ids = {}
    for s, i in vocab.items():
        try:
            ids[bytes(decode_char[c] for c in s)] = i
        except KeyError as e:
            raise ValueError(f"{where}: vocab entry {s!r} is not a byte-level string") from e
    pairs = []
    for k, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        try:
            pairs.append((vocab[left], vocab[right]))
        except KeyError as e:
            raise ValueError(f"{where}: merge #{k} {merge!r} uses a string missing from the vocab") from e
    bpe = _rustbpe.Bpe.from_merges(pairs)
    rebuilt = {b: i for i, b in enumerate(bpe.token_bytes())}
    if rebuilt != ids:
        raise ValueError(f"{where}: vocab ids do not follow the merges (ids must be bytes, then merges in order)")
    specials = {t["content"]: t["id"] for t in added}
    expected = {name: len(rebuilt) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise ValueError(f"{where}: special tokens {specials} differ from the expected {expected}")
    return bpe


class Tokenizer:
    """Byte-level BPE with nanochat's special tokens and chat rendering. Build it with
    train_from_iterator or load; the constructor takes the Rust core and is internal."""

    def __init__(self, bpe: _rustbpe.Bpe, tokenizer_json: str | None = None):
        self._bpe = bpe
        self._json = tokenizer_json if tokenizer_json is not None else _tokenizer_json(bpe)
        self._fingerprint = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self._token_bytes = bpe.token_bytes()
        self.vocab_size: int = bpe.vocab_size
        self.bos_token_id: int = bpe.encode_special("<|bos|>")

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int, *,
                            show_progress: bool | None = None) -> Tokenizer:
        """Trains on a stream of texts; vocab_size (512..65536) counts bytes, merges and special tokens.
        If the corpus runs out of pairs first the vocabulary is smaller, with a warning. Progress bars
        show on a terminal (show_progress=None) or as asked."""
        if isinstance(texts, str):
            raise TypeError("train_from_iterator: texts must be an iterable of str, not a single str")
        disable = None if show_progress is None else not show_progress
        reading = tqdm(desc="tokenizer: reading texts", unit=" texts", disable=disable)
        merging = None

        def counted(it):
            n = 0
            for n, text in enumerate(it, 1):
                if n % 1024 == 0:  # tqdm.update per text would cost more than the Rust counting
                    reading.update(1024)
                yield text
            reading.update(n % 1024)

        def progress(done: int, wanted: int) -> None:
            nonlocal merging
            if merging is None:  # reading is over
                reading.close()
                merging = tqdm(total=wanted, desc="tokenizer: merges", disable=disable)
            merging.update(done - merging.n)

        try:
            iterable = counted(iter(texts))
        except TypeError:
            iterable = texts  # not iterable: the Rust core raises the clear error
        try:
            bpe = _rustbpe.Bpe.train(iterable, vocab_size, progress=progress)
        finally:
            reading.close()
            if merging is not None:
                merging.close()
        if bpe.vocab_size < vocab_size:
            warnings.warn(f"train_from_iterator: corpus ran out of pairs to merge; vocab_size is "
                          f"{bpe.vocab_size}, not the requested {vocab_size}", stacklevel=2)
        return cls(bpe)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Reads directory/tokenizer.json as written by save()."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer.load: no {TOKENIZER_FILE} in {directory}")
        text = path.read_bytes().decode("utf-8")
        return cls(_bpe_from_tokenizer_json(text, str(path)), tokenizer_json=text)

    def save(self, directory: str | Path) -> None:
        """Writes directory/tokenizer.json, loadable by HF `tokenizers.Tokenizer.from_file` too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (TOKENIZER_FILE + ".tmp")
        try:
            tmp.write_bytes(self._json.encode("utf-8"))
            tmp.replace(directory / TOKENIZER_FILE)
        except OSError as e:  # a full disk: no half file left behind, and the message names the file
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, f"could not write {directory / TOKENIZER_FILE}: {e.strerror or e}") from None

    def fingerprint(self) -> str:
        """sha256 of the saved tokenizer.json: checkpoints use it to catch a swapped tokenizer."""
        return self._fingerprint

    def __getstate__(self) -> dict:
        """Pickles as its tokenizer.json (for DataLoader workers and multiprocessing)."""
        return {"tokenizer_json": self._json}

    def __setstate__(self, state: dict) -> None:
        text = state["tokenizer_json"]
        self.__init__(_bpe_from_tokenizer_json(text, "pickled Tokenizer"), tokenizer_json=text)

    def hf_tokenizer(self):
        """This tokenizer as an HF `tokenizers.Tokenizer` (same ids; special-token strings in text are
        kept as ordinary text, like ours)."""
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._json)
        tok.encode_special_tokens = True
        return tok

    def hf_pretrained_tokenizer(self, model_max_length: int | None = None):
        """This tokenizer as a transformers `PreTrainedTokenizerFast` (what TransformerLens code expects in
        `model.tokenizer`): same ids as encode (special-token strings in text stay ordinary text), callable,
        batch_decode, with bos/eos/pad set as the HF export writes them (HF_SPECIAL_TOKENS: <|bos|>, and
        <|assistant_end|> for eos and pad, nanochat's end of an assistant turn). It adds no BOS itself
        (add_special_tokens has nothing to add); TL's to_tokens puts <|bos|> first (prepend_bos)."""
        from transformers import PreTrainedTokenizerFast

        kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
        return PreTrainedTokenizerFast(tokenizer_object=self.hf_tokenizer(), split_special_tokens=True,
                                       name_or_path=f"aquainterp-bpe-{self.fingerprint()[:12]}",
                                       **HF_SPECIAL_TOKENS, **kwargs)

    # ---- encoding ----

    def _special_or_id(self, token: int | str, what: str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
            raise ValueError(f"encode: {what} must be a special token name or an id in 0..{self.vocab_size - 1}; "
                             f"got {token!r}")
        return token

    def encode(self, text: str, prepend: int | str | None = None, append: int | str | None = None) -> list[int]:
        """Token ids of `text`, optionally with a token (id or special name) before and/or after."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        ids = self._bpe.encode(text)
        if prepend is not None:
            ids.insert(0, self._special_or_id(prepend, "prepend"))
        if append is not None:
            ids.append(self._special_or_id(append, "append"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many texts in parallel (Rust threads, GIL released)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] must be str, got {type(t).__name__}")
        return self._bpe.encode_batch(list(texts))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, per token, the [start, end) character span of `text` it comes from. A token holding
        only part of a multi-byte character gets that whole character's span (so neighbours may share it)."""
        ids = self.encode(text)
        char_of_byte = []  # index of the character each UTF-8 byte belongs to
        for ci, ch in enumerate(text):
            char_of_byte.extend([ci] * len(ch.encode("utf-8")))
        offsets, pos = [], 0
        for t in ids:
            n = len(self._token_bytes[t])
            offsets.append((char_of_byte[pos], char_of_byte[pos + n - 1] + 1))
            pos += n
        return ids, offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens as their names); invalid UTF-8 becomes U+FFFD. Ids must be
        integers (int, numpy or torch integer types): 1.5, True or "7" are refused, not truncated."""
        ids = token_ids(ids)
        try:
            return self._bpe.decode(ids)
        except OverflowError:  # beyond 64 bits: Rust cannot even take it; name it like the Rust range error
            pos = next((p for p, i in enumerate(ids) if not -2**63 <= i < 2**63), 0)
            raise ValueError(f"token id {ids[pos]} at position {pos} is out of range: the vocabulary has ids "
                             f"0..{self.vocab_size - 1}") from None

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token's name for specials)."""
        return self._bpe.decode_bytes([int(token_id)])

    def token_str(self, token_id: int) -> str:
        """Readable label for plots: the token's text with newlines/tabs escaped and bytes that are not
        whole UTF-8 characters shown as \\xNN."""
        data = self.token_bytes(token_id)
        text = data.decode("utf-8", errors="backslashreplace")
        return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")

    def encode_special(self, name: str) -> int:
        """Id of a special token such as "<|bos|>"; ValueError if unknown."""
        return self._bpe.encode_special(name)

    # ---- chat ----

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) for a chat, as nanochat's render_conversation: <|bos|>, then per user message
        <|user_start|> text <|user_end|> (mask 0), per assistant message <|assistant_start|> (mask 0) and
        its text + <|assistant_end|> (mask 1, what the loss trains on). A leading system message is
        merged into the first user message. Assistant content may also be a list of parts
        {"type": "text"|"python"|"python_output", "text": ...}: tool output is masked 0. Truncated
        to max_tokens."""
        messages = _validated_messages(conversation)
        special = {name: self.encode_special(name) for name in SPECIAL_TOKENS}
        ids, mask = [self.bos_token_id], [0]

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "user":
                add([special["<|user_start|>"]], 0)
                add(self.encode(content), 0)
                add([special["<|user_end|>"]], 0)
                continue
            add([special["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for j, part in enumerate(content):
                    kind, text = _part(part, i, j)
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add([special["<|python_start|>"], *self.encode(text), special["<|python_end|>"]], 1)
                    else:
                        add([special["<|output_start|>"], *self.encode(text), special["<|output_end|>"]], 0)
            add([special["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for sampling the last assistant turn: the conversation without its last assistant
        message (if it ends with one), then <|assistant_start|>. Never truncated."""
        messages = _validated_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=2**62)
        return ids + [self.encode_special("<|assistant_start|>")]


def _validated_messages(conversation: dict) -> list[dict]:
    """The messages with a leading system message merged into the first user message; ValueError
    naming the message when roles do not alternate user/assistant."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError("conversation must be a dict with a 'messages' list")
    messages = conversation["messages"]
    if not messages:
        raise ValueError("conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"conversation message {i} must be a dict with 'role' and 'content'")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("conversation: a system message must be followed by a user message")
        if not isinstance(messages[0]["content"], str) or not isinstance(messages[1]["content"], str):
            raise ValueError("conversation: system and first user message content must be str")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged, *messages[2:]]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"conversation message {i} has role {m['role']!r}, expected {expected!r} "
                             f"(user and assistant alternate, starting with user)")
        if m["role"] == "user" and not isinstance(m["content"], str):
            raise ValueError(f"conversation message {i}: user content must be str")
        if m["role"] == "assistant" and not isinstance(m["content"], str | list):
            raise ValueError(f"conversation message {i}: assistant content must be str or a list of parts")
    return messages


def _part(part, message_index: int, part_index: int) -> tuple[str, str]:
    kinds = ("text", "python", "python_output")
    if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
        raise ValueError(f"conversation message {message_index} part {part_index} must be "
                         f"{{'type': one of {kinds}, 'text': str}}; got {part!r}")
    return part["type"], part["text"]
