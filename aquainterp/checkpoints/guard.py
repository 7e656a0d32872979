"""Check a checkpoint's model_config before any weight is allocated.

`model_config` in meta.json is outside the file hashes (a hand edit, or a file from elsewhere, keeps
its sha256 list valid), and the model it describes is what gets allocated. A vocab_size of 3e7 or a
sequence_len of 2e6 would make loading take all the machine's memory before any shape check ran. So
`preflight` runs first and allocates nothing:

1. the config's sizes must be within sane bounds (LIMITS);
2. the safetensors header of model.safetensors is read on its own (8-byte length + JSON, both bounded
   by the file size), and its offsets must tile the file's data;
3. the model is built on the meta device (shapes only, no memory) and every parameter's shape must
   equal the header's.

Any failure is a CheckpointError naming the file, the field or tensor, and both values.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from aquainterp.checkpoints.native import (
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    _check_file,
    _read_meta,
    key_mismatch,
)

# Upper bounds on model_config sizes. Generous for real models (nanochat d32: 2048 x 65536 vocab, 32 layers;
# frontier vocabularies are ~2.6e5) and small enough that a typo or a hostile meta cannot exhaust memory.
LIMITS = {
    "sequence_len": 1 << 20,
    "vocab_size": 1 << 22,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 1 << 16,
    "mlp_hidden": 1 << 18,
    "pad_vocab_size_to": 1 << 12,
}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from a safetensors header, read without loading any tensor. The header's
    length, dtypes and offsets are checked against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file, {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    data = size - 8 - n
    shapes, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape) \
                and isinstance(start, int) and isinstance(end, int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: header entry {name!r} is malformed: {str(info)[:200]}")
        if not 0 <= start <= end <= data or end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} {dtype}{list(shape)} does not fit its offsets "
                                  f"{start}..{end} in {data} data bytes")
        shapes[name] = shape
        spans.append((start, end))
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves a gap at byte {covered}")
        covered = end
    if covered != data:
        raise CheckpointError(f"{path}: tensors cover {covered} of {data} data bytes")
    return shapes


def check_bounds(config: dict, where: str) -> None:
    for name, limit in LIMITS.items():
        value = config.get(name)
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise CheckpointError(f"{where}: model_config.{name} must be an int, got {value!r}")
        if value is not None and value > limit:
            raise CheckpointError(f"{where}: model_config.{name} = {value:,} is beyond the limit {limit:,}; "
                                  "refusing to build such a model (corrupt or hostile meta.json?)")


def meta_model(config_dict: dict, where: str):
    """The GPT of a config on the meta device: its parameter shapes, no memory."""
    from aquainterp.model.gpt import GPT, GPTConfig

    try:
        config = GPTConfig.from_dict(config_dict)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: bad model_config: {e}") from e
    with torch.device("meta"):
        return config, GPT(config)


def check_shapes(config_dict: dict, shapes: dict[str, tuple[int, ...]], where: str, weights: Path) -> None:
    check_bounds(config_dict, where)
    _, model = meta_model(config_dict, where)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = key_mismatch(expected, shapes, 4)
    if mismatch:
        raise CheckpointError(f"{weights}: tensors do not match model_config in {where}: {mismatch}")
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise CheckpointError(f"{where}: model_config does not match {weights.name}: {k} shape would be "
                                  f"{list(shape)} but the file holds {list(shapes[k])} "
                                  f"({_config_hint(config_dict)})")


def _config_hint(config: dict) -> str:
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_kv_head", "sequence_len")
    return "model_config: " + ", ".join(f"{k} {config[k]}" for k in keys if k in config)


def preflight(path: str | Path) -> dict:
    """Validate one step folder's model_config against bounds and model.safetensors' header; returns the
    config dict. Allocates nothing: run it before building or loading the model."""
    path = Path(path)
    meta_path = path / META_FILE
    meta = _read_meta(path)
    for name, expected in meta["files"].items():  # sizes only (cheap); load_checkpoint checks the hashes
        _check_file(path, name, expected, verify_hash=False)
    config = meta.get("model_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{meta_path}: no 'model_config'; cannot rebuild the model")
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (listed in {META_FILE})")
    check_shapes(config, safetensors_shapes(weights), str(meta_path), weights)
    return config
