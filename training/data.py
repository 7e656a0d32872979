"""Training data: document sources, packing into rows, conversation batches, and where a run stands in them.

Every rank reads the same global sequence of rows and keeps its own contiguous slice of each step's
rows, so a step's global batch is the same whatever the number of processes (the 2-process == 1-process
test rests on this), and the position in the data is one small JSON object stored in each checkpoint:

    packed rows (base, mid):   {"doc": i, "offset": k}   next token = token k of document i
    conversation rows (sft):   {"doc": i}                next row = conversation i

Document sources for base training (one loader for local files and the hub):
    "synthetic", "synthetic:SEED" or "synthetic:SEED:DIFFICULTY"
                                      the embedded synthetic task as plain text, infinite (difficulty
                                      1-3; default the task's mix)
    a .parquet / .jsonl / .json file or a folder of them (column/field "text"), through `datasets`
    "hf:NAME" or "hf:NAME:CONFIG"     a hub corpus such as hf:HuggingFaceFW/fineweb-edu:sample-10BT, streamed
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ENCODE_BATCH = 128  # documents tokenized per encode_batch call


class DataExhaustedError(RuntimeError):
    """A finite document source ended before the run asked for its last row."""


# ----------------------------------------------------------------------------------------------
# Document sources


def _local_files(path: Path) -> tuple[str, list[str]]:
    suffixes = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
    files = sorted(p for p in path.rglob("*") if p.suffix in suffixes) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"data source {path}: no .parquet/.jsonl/.json files in this folder")
    kinds = {suffixes.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data source {path}: files must all be .parquet or all .jsonl/.json, got "
                         f"{sorted({p.suffix for p in files})}")
    return kinds.pop(), [str(p) for p in files]


def _stream_texts(builder: str, start: int, text_field: str, where: str, **kwargs) -> Iterator[str]:
    import datasets

    stream = datasets.load_dataset(builder, split=kwargs.pop("split", "train"), streaming=True, **kwargs)
    for i, row in enumerate(stream.skip(start) if start else stream):
        if text_field not in row or not isinstance(row[text_field], str):
            raise ValueError(f"data source {where}: document {start + i} has no string field {text_field!r} "
                             f"(fields: {sorted(row)}); name the text field with --text-field")
        yield row[text_field]


def documents(source: str, start: int = 0, text_field: str = "text") -> Iterator[str]:
    """Documents of `source` from index `start` on (see the module docstring for the spellings)."""
    if source == "synthetic" or source.startswith("synthetic:"):
        from aquainterp.tasks.synthetic import SyntheticTask, document

        seed, _, level = source.partition(":")[2].partition(":")
        try:
            task = SyntheticTask(seed=int(seed or 0), split="train", difficulty=int(level) if level else None)
        except ValueError as e:
            raise ValueError(f"data source {source!r}: expected synthetic[:SEED[:DIFFICULTY]] ({e})") from None
        return (document(task.problem(i)) for i in itertools.count(start))
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return _stream_texts(name, start, text_field, source, name=config or None)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or folder (and not synthetic[:SEED[:DIFFICULTY]] "
                                "or hf:NAME[:CONFIG])")
    builder, files = _local_files(path)
    return _stream_texts(builder, start, text_field, source, data_files=files)


# ----------------------------------------------------------------------------------------------
# Packing: documents -> a stream of tokens -> rows of seq_len + 1


class PackedRows:
    """Concatenates encoded documents and cuts the stream into rows of `row_len` tokens.

    `encode(items)` turns a list of documents into a list of (ids, mask) pairs; mask 1 marks tokens
    that are trained on as targets (all of them for plain text, the assistant's for conversations).
    `items(start)` yields documents from index `start`.
    """

    def __init__(self, items: Callable[[int], Iterator], encode: Callable[[list], list[tuple[list[int], list[int]]]],
                 row_len: int, position: dict | None = None, name: str = "data"):
        self.items, self.encode, self.row_len, self.name = items, encode, row_len, name
        self.load_state(position or {"doc": 0, "offset": 0})

    def load_state(self, position: dict) -> None:
        self._next_doc = int(position["doc"])
        self._iter = self.items(self._next_doc)
        self._pending: deque[list] = deque()  # [doc index, ids, mask, offset]
        self._skip = int(position.get("offset", 0))

    def state(self) -> dict:
        if self._pending:
            doc, _, _, offset = self._pending[0]
            return {"doc": doc, "offset": offset}
        return {"doc": self._next_doc, "offset": self._skip}

    def _fill(self) -> None:
        batch = list(itertools.islice(self._iter, ENCODE_BATCH))
        if not batch:
            raise DataExhaustedError(f"{self.name}: ran out of documents after document {self._next_doc - 1}; "
                                     "ask for fewer steps or give a larger source")
        for ids, mask in self.encode(batch):
            offset, self._skip = (self._skip, 0) if self._skip else (0, 0)
            if offset > len(ids):
                raise ValueError(f"{self.name}: resume offset {offset} is past the end of document "
                                 f"{self._next_doc} ({len(ids)} tokens); different tokenizer or data?")
            if offset < len(ids):
                self._pending.append([self._next_doc, ids, mask, offset])
            self._next_doc += 1

    def take(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each [n_rows, row_len] int64."""
        need = n_rows * self.row_len
        ids_out, mask_out = [], []
        while need:
            while not self._pending:
                self._fill()
            entry = self._pending[0]
            _, ids, mask, offset = entry
            k = min(need, len(ids) - offset)
            ids_out.extend(ids[offset:offset + k])
            mask_out.extend(mask[offset:offset + k])
            entry[3] += k
            need -= k
            if entry[3] == len(ids):
                self._pending.popleft()
        shape = (n_rows, self.row_len)
        return torch.tensor(ids_out).view(shape), torch.tensor(mask_out).view(shape)


def text_encoder(tokenizer) -> Callable[[list[str]], list[tuple[list[int], list[int]]]]:
    """Plain text: BOS + tokens, every token a target."""
    bos = tokenizer.bos_token_id

    def encode(texts):
        return [([bos, *ids], [1] * (len(ids) + 1)) for ids in tokenizer.encode_batch(texts)]

    return encode


def conversation_encoder(tokenizer, max_tokens: int) -> Callable[[list[dict]], list[tuple[list[int], list[int]]]]:
    """Chats: render_conversation's ids and its assistant-only loss mask."""
    def encode(conversations):
        return [tokenizer.render_conversation(c, max_tokens=max_tokens) for c in conversations]

    return encode


def inputs_targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of T+1 -> (x [.., T], y [.., T]) with y = -1 where the target is not trained on."""
    x = ids[:, :-1]
    y = ids[:, 1:].clone()
    y[mask[:, 1:] == 0] = -1
    return x.contiguous(), y


# ----------------------------------------------------------------------------------------------
# One optimizer step's batches for this rank


def micro_steps(total_rows: int, device_batch_size: int, world_size: int, what: str) -> int:
    """Gradient-accumulation steps so that device_batch_size × world_size × accum == total_rows."""
    per_step = device_batch_size * world_size
    if total_rows % per_step:
        raise ValueError(f"{what}={total_rows} is not a multiple of --device-batch-size × processes = "
                         f"{device_batch_size} × {world_size}")
    return total_rows // per_step


class PackedBatches:
    """Base/mid: each step reads `total_rows` packed rows; this rank trains on its slice of them."""

    def __init__(self, rows: PackedRows, total_rows: int, device_batch_size: int, rank: int, world_size: int):
        self.rows, self.total_rows, self.B = rows, total_rows, device_batch_size
        self.accum = micro_steps(total_rows, device_batch_size, world_size, "rows per step")
        self.rank = rank

    def next_step(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids, mask = self.rows.take(self.total_rows)
        per_rank = self.B * self.accum
        ids = ids[self.rank * per_rank:(self.rank + 1) * per_rank]
        mask = mask[self.rank * per_rank:(self.rank + 1) * per_rank]
        out = []
        for i in range(self.accum):
            x, y = inputs_targets(ids[i * self.B:(i + 1) * self.B], mask[i * self.B:(i + 1) * self.B])
            out.append((x.to(device), y.to(device)))
        return out

    def state(self) -> dict:
        return self.rows.state()

    def load_state(self, position: dict) -> None:
        self.rows.load_state(position)


class ConversationBatches:
    """SFT: each step takes `examples_per_step` whole conversations, cycling through a fixed list;
    a micro-batch is padded to its longest conversation (padding is never a target)."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], examples_per_step: int, device_batch_size: int,
                 rank: int, world_size: int, pad_id: int):
        if not encoded:
            raise ValueError("SFT mixture is empty: give at least one source with rows")
        self.encoded, self.E, self.B = encoded, examples_per_step, device_batch_size
        self.accum = micro_steps(examples_per_step, device_batch_size, world_size, "--examples-per-step")
        self.rank, self.pad_id, self.doc = rank, pad_id, 0

    def next_step(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start = self.doc + self.rank * self.B * self.accum
        self.doc += self.E
        out = []
        for i in range(self.accum):
            rows = [self.encoded[(start + i * self.B + j) % len(self.encoded)] for j in range(self.B)]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((self.B, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((self.B, width), dtype=torch.long)
            for j, (r_ids, r_mask) in enumerate(rows):
                ids[j, :len(r_ids)] = torch.tensor(r_ids)
                mask[j, :len(r_mask)] = torch.tensor(r_mask)
            x, y = inputs_targets(ids, mask)
            out.append((x.to(device), y.to(device)))
        return out

    def state(self) -> dict:
        return {"doc": self.doc}

    def load_state(self, position: dict) -> None:
        self.doc = int(position["doc"])
