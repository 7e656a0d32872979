"""nanochat's tokenizer file (`tokenizer/tokenizer.pkl`), read without running it and written back.

nanochat pickles a `tiktoken.core.Encoding`; the pickle holds one global (that class) and its state:
name, pat_str, mergeable_ranks (token bytes -> id) and special_tokens (name -> id). Unpickling such a
file with `pickle.load` would run whatever globals it names, so `read_encoding_state` uses an
Unpickler whose only constructible global is a stand-in for `tiktoken.core.Encoding` that accepts
exactly that state (plain dicts, strings, bytes, ints) and nothing else: any other global, a
persistent id, or a state of another shape is refused with one line.

`tokenizer_from_encoding_state` turns the state into our Tokenizer (the Rust BPE rebuilt from merges):
ranks 0..255 must be the single bytes, the rest merges in rank order, then nanochat's 9 special tokens,
and the split pattern must be nanochat's. The merge pair of each rank is recovered the way tiktoken
encodes (byte-pair merging by lowest rank, using only lower ranks), and the rebuilt BPE must list the
very same bytes for every id, so encoding gives nanochat's ids. `write_tokenizer_pkl` writes the
pickle nanochat reads (the same opcodes pickle emits for an Encoding), plus `token_bytes.pt`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from aquainterp import _rustbpe
from aquainterp.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

ENCODING_GLOBAL = ("tiktoken.core", "Encoding")
STATE_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens"}


class NanochatTokenizerError(ValueError):
    """A tokenizer.pkl we will not read: foreign globals, wrong state, or a vocabulary we cannot rebuild."""


class _EncodingState:
    """What the restricted unpickler builds in place of tiktoken's Encoding: only its state, checked."""

    state: dict

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) != STATE_KEYS:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise pickle.UnpicklingError(f"Encoding state must have keys {sorted(STATE_KEYS)}, got {keys}")
        name, pat, ranks, specials = (state[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens"))
        if not isinstance(name, str) or not isinstance(pat, str):
            raise pickle.UnpicklingError("Encoding state: name and pat_str must be strings")
        if not isinstance(ranks, dict) or not all(type(b) is bytes and type(r) is int for b, r in ranks.items()):
            raise pickle.UnpicklingError("Encoding state: mergeable_ranks must map bytes to ints")
        if not isinstance(specials, dict) or not all(type(s) is str and type(r) is int for s, r in specials.items()):
            raise pickle.UnpicklingError("Encoding state: special_tokens must map strings to ints")
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ENCODING_GLOBAL:
            return _EncodingState
        raise pickle.UnpicklingError(f"refuses global {module}.{name} (only {'.'.join(ENCODING_GLOBAL)} is expected)")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refuses persistent ids")


def read_encoding_state(path: str | Path) -> dict:
    """The Encoding state inside a nanochat tokenizer.pkl, constructing nothing else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise NanochatTokenizerError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise NanochatTokenizerError(f"{path}: not a nanochat tokenizer pickle: {e}") from e
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError,
            OverflowError, MemoryError) as e:
        raise NanochatTokenizerError(f"{path}: not a nanochat tokenizer pickle (truncated or corrupt: "
                                     f"{type(e).__name__}: {e})") from e
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise NanochatTokenizerError(f"{path}: not a nanochat tokenizer pickle (holds a {type(obj).__name__}, "
                                     f"expected a {'.'.join(ENCODING_GLOBAL)} with its state)")
    return obj.state


def _merge_pair(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[int, int] | None:
    """The two tokens tiktoken's byte-pair merge ends with for `token`, using only ranks below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, where = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, where = r, i
        if best is None:
            return None
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    if len(parts) != 2 or parts[0] not in ranks or parts[1] not in ranks:
        return None
    return ranks[parts[0]], ranks[parts[1]]


def tokenizer_from_encoding_state(state: dict, where: str = "tokenizer.pkl") -> Tokenizer:
    """Our Tokenizer with the same ids as the nanochat Encoding whose state this is."""
    if state["pat_str"] != SPLIT_PATTERN:
        raise NanochatTokenizerError(f"{where}: split pattern {state['pat_str']!r} is not nanochat's; "
                                     "this tokenizer cannot be reproduced")
    ranks: dict[bytes, int] = state["mergeable_ranks"]
    n = len(ranks)
    by_rank = sorted(ranks, key=ranks.get)
    if n < 256 or [ranks[b] for b in by_rank] != list(range(n)):
        raise NanochatTokenizerError(f"{where}: mergeable_ranks must be ids 0..{n - 1} without gaps (got {n} entries)")
    if by_rank[:256] != [bytes([i]) for i in range(256)]:
        raise NanochatTokenizerError(f"{where}: ids 0..255 must be the single bytes in order")
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if state["special_tokens"] != expected:
        raise NanochatTokenizerError(f"{where}: special tokens {state['special_tokens']} differ from nanochat's "
                                     f"{expected}")
    pairs = []
    for r in range(256, n):
        pair = _merge_pair(by_rank[r], ranks, r)
        if pair is None:
            raise NanochatTokenizerError(f"{where}: token {r} ({by_rank[r]!r}) is not a merge of two lower-ranked tokens")
        pairs.append(pair)
    bpe = _rustbpe.Bpe.from_merges(pairs)
    if list(bpe.token_bytes()) != by_rank:
        raise NanochatTokenizerError(f"{where}: the merges rebuilt from mergeable_ranks give other token bytes")
    return Tokenizer(bpe)


def load_nanochat_tokenizer(directory: str | Path) -> Tokenizer:
    """Tokenizer from a nanochat `tokenizer/` folder (its tokenizer.pkl)."""
    path = Path(directory) / "tokenizer.pkl"
    return tokenizer_from_encoding_state(read_encoding_state(path), str(path))


def encoding_state(tokenizer: Tokenizer, name: str = "rustbpe") -> dict:
    """The tiktoken Encoding state nanochat pickles, for our tokenizer."""
    n = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    return {
        "name": name,
        "pat_str": SPLIT_PATTERN,
        "mergeable_ranks": {tokenizer.token_bytes(i): i for i in range(n)},
        "special_tokens": {s: n + i for i, s in enumerate(SPECIAL_TOKENS)},
    }


def write_tokenizer_pkl(tokenizer: Tokenizer, directory: str | Path) -> None:
    """directory/tokenizer.pkl (a pickled tiktoken Encoding, as nanochat writes it) and token_bytes.pt
    (bytes per id, 0 for special tokens: what nanochat's bits-per-byte evaluation reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = encoding_state(tokenizer)
    body = pickle.dumps(state, protocol=3)  # no framing, no globals: PROTO 3 ... STOP
    assert body[:2] == b"\x80\x03" and body[-1:] == b"."
    # PROTO 4, GLOBAL tiktoken.core Encoding, EMPTY_TUPLE, NEWOBJ, <state>, BUILD, STOP
    data = (b"\x80\x04c" + f"{ENCODING_GLOBAL[0]}\n{ENCODING_GLOBAL[1]}\n".encode() + b")\x81"
            + body[2:-1] + b"b.")
    (directory / "tokenizer.pkl").write_bytes(data)
    n = tokenizer.vocab_size - len(SPECIAL_TOKENS)
    lengths = [len(tokenizer.token_bytes(i)) for i in range(n)] + [0] * len(SPECIAL_TOKENS)
    torch.save(torch.tensor(lengths, dtype=torch.int32), directory / "token_bytes.pt")
