"""Checkpoints: model and optimizer tensors as safetensors, everything else as JSON.

Layout of one checkpoint (one folder per step, so a run keeps its history):

    directory/step_000123/model.safetensors   model.state_dict(), keys = module paths
    directory/step_000123/optim.safetensors   every optimizer state tensor, flattened to "opt{i}/{param}/{key}"
    directory/step_000123/meta.json           model config, step, data position, RNG states, tokenizer
                                              fingerprint, optimizer hyper-parameters, file sizes + sha256
    directory/step_000123/tokenizer/          the tokenizer (when one was given)

Why this shape: safetensors and JSON load without unpickling (a checkpoint from elsewhere cannot run
code), and a half-written checkpoint must never look like a good one. So a checkpoint is written into
a hidden temp folder, every file and the folder are fsynced, and only then is the folder renamed to
its final name (rename is atomic on POSIX). A SIGKILL at any moment leaves either the old set of
checkpoints or the old set plus the complete new one.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    optim_state: list[dict] | None
    meta: dict
    path: Path = field(default_factory=Path)


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


# ----------------------------------------------------------------------------------------------
# Optimizer state <-> flat tensors + JSON


def _flatten_optimizers(optimizers: list) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split each optimizer's state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    described = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        state_json: dict[str, dict[str, Any]] = {}
        for pid, pstate in sd["state"].items():
            entry = {}
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    name = f"opt{i}/{pid}/{key}"
                    tensors[name] = value.detach().contiguous().cpu()
                    entry[key] = {"tensor": name}
                else:
                    entry[key] = {"value": value}
            state_json[str(pid)] = entry
        groups = []
        for group in sd["param_groups"]:
            groups.append({k: _jsonable(v, f"optimizer {i} param group {k!r}") for k, v in group.items()})
        described.append({"type": type(opt).__name__, "state": state_json, "param_groups": groups})
    return tensors, described


def _jsonable(value: Any, where: str) -> Any:
    """Param-group values are numbers, bools, None, strings or tuples of those; tuples are tagged."""
    if isinstance(value, tuple):
        return {"tuple": [_jsonable(v, where) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise CheckpointError(f"cannot store {where}: a tensor with {value.numel()} elements")
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store {where}: {type(value).__name__} is not JSON-able")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _unflatten_optimizers(described: list[dict], tensors: dict[str, torch.Tensor], where: Path) -> list[dict]:
    out = []
    for opt in described:
        state = {}
        for pid, entry in opt["state"].items():
            pstate = {}
            for key, spec in entry.items():
                if "tensor" in spec:
                    if spec["tensor"] not in tensors:
                        raise CheckpointError(f"{where / OPTIM_FILE}: tensor {spec['tensor']!r} named in "
                                              f"{META_FILE} is missing")
                    pstate[key] = tensors[spec["tensor"]]
                else:
                    pstate[key] = spec["value"]
            state[int(pid)] = pstate
        groups = [{k: _from_json(v) for k, v in g.items()} for g in opt["param_groups"]]
        out.append({"state": state, "param_groups": groups})
    return out


# ----------------------------------------------------------------------------------------------
# RNG states as JSON (so resume continues the same random streams)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA when present) generator states, all JSON-able."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ----------------------------------------------------------------------------------------------
# Writing


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_tensors(model) -> dict[str, torch.Tensor]:
    """state_dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_checkpoint(directory, step: int, model, optimizers: list | None, meta: dict,
                    *, tokenizer=None) -> Path:
    """Write directory/step_{step:06d}/ atomically; returns its path. Call it on rank 0 only.

    `model` is a module (or a state dict); its `config.to_dict()` is stored as meta["model_config"].
    `tokenizer` (optional) is saved alongside and its fingerprint stored as meta["tokenizer_fingerprint"].
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = step_dir(directory, step)
    tmp = directory / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    meta = dict(meta)
    meta["format_version"] = FORMAT_VERSION
    meta["step"] = step
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta["model_config"] = config.to_dict()

    try:  # a full disk (ENOSPC) can strike any write or fsync below: one clear error, no temp folder left
        save_file(_model_tensors(model), str(tmp / MODEL_FILE))
        files = [MODEL_FILE]
        if optimizers:
            tensors, described = _flatten_optimizers(optimizers)
            save_file(tensors, str(tmp / OPTIM_FILE))
            meta["optimizers"] = described
            files.append(OPTIM_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
            meta["tokenizer_fingerprint"] = tokenizer.fingerprint()
            for p in sorted((tmp / TOKENIZER_DIR).iterdir()):
                files.append(f"{TOKENIZER_DIR}/{p.name}")
        meta["files"] = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                         for name in files}
        try:
            text = json.dumps(meta, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            shutil.rmtree(tmp)
            raise CheckpointError(f"save_checkpoint: meta for step {step} is not JSON-able: {e}") from e
        (tmp / META_FILE).write_text(text)

        for name in [*files, META_FILE]:
            _fsync_file(tmp / name)
        if tokenizer is not None:
            _fsync_dir(tmp / TOKENIZER_DIR)
        _fsync_dir(tmp)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e):
            raise CheckpointError(f"{final}: disk full (no space left on device) while writing this checkpoint; "
                                  f"the partial files were removed, earlier checkpoints in {directory} are "
                                  f"untouched. Free space and resume.") from e
        raise
    if final.exists():  # re-saving a step: move the old one aside first, so one whole copy always exists
        old = directory / f".old_{final.name}_{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(directory)
    return final


# ----------------------------------------------------------------------------------------------
# Reading


def available_steps(directory) -> list[int]:
    """Steps of complete checkpoints (folders whose rename happened), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / META_FILE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(directory) -> int | None:
    steps = available_steps(directory)
    return steps[-1] if steps else None


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing (not a complete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e}); the file is truncated or corrupt") from e
    if not isinstance(meta, dict) or "files" not in meta:
        raise CheckpointError(f"{meta_path}: no 'files' manifest; not written by aquainterp.checkpoints.native")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                              f"this code reads {FORMAT_VERSION}")
    return meta


def _check_file(path: Path, name: str, expected: dict, verify_hash: bool) -> None:
    f = path / name
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (listed in {META_FILE})")
    size = f.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{f}: truncated or altered: {size} bytes, {META_FILE} says {expected['bytes']}")
    if verify_hash and _sha256(f) != expected["sha256"]:
        raise CheckpointError(f"{f}: corrupt: sha256 differs from the one in {META_FILE}")


def _load_tensors(f: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors ({e})") from e


def load_checkpoint(directory, step: int | None = None, device="cpu", *, verify_hash: bool = True) -> Checkpoint:
    """Load one checkpoint (the latest when step is None). Never unpickles."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory}: does not exist")
    steps = available_steps(directory)
    if step is None:
        if not steps:
            raise CheckpointError(f"checkpoint directory {directory}: holds no complete checkpoint (step_NNNNNN/)")
        step = steps[-1]
    path = step_dir(directory, step)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint for step {step}; available steps: {steps or 'none'}")
    meta = _read_meta(path)
    for name, expected in meta["files"].items():
        _check_file(path, name, expected, verify_hash)
    model_state = _load_tensors(path / MODEL_FILE, device)
    optim_state = None
    if OPTIM_FILE in meta["files"]:
        tensors = _load_tensors(path / OPTIM_FILE, device)
        optim_state = _unflatten_optimizers(meta.get("optimizers", []), tensors, path)
    return Checkpoint(model_state=model_state, optim_state=optim_state, meta=meta, path=path)


def key_mismatch(expected, got, shown: int) -> str | None:
    """"missing [...], unexpected [...]" (at most `shown` names each) when the two key sets differ, else None."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if not (missing or extra):
        return None
    names = lambda keys: f"{keys[:shown]}{' ...' if len(keys) > shown else ''}"
    return f"missing {names(missing)}, unexpected {names(extra)}"


def load_state_into(model, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """model.load_state_dict with errors that name the file, the key and both shapes."""
    own = model.state_dict()
    mismatch = key_mismatch(own, state, 5)
    if mismatch:
        raise CheckpointError(f"{where}: keys do not match the model: {mismatch}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"{where}: {k!r} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (wrong model config?)")
    model.load_state_dict(state, strict=True)


def load_optimizers(optimizers: list, ckpt: Checkpoint) -> None:
    """Restore optimizer states; errors name the checkpoint and what does not fit."""
    where = ckpt.path / OPTIM_FILE
    if ckpt.optim_state is None:
        raise CheckpointError(f"{where}: missing; this checkpoint has no optimizer state to resume from")
    if len(ckpt.optim_state) != len(optimizers):
        raise CheckpointError(f"{where}: holds {len(ckpt.optim_state)} optimizers, the run has {len(optimizers)}")
    for i, (opt, sd) in enumerate(zip(optimizers, ckpt.optim_state)):
        saved_type = ckpt.meta["optimizers"][i]["type"]
        if saved_type != type(opt).__name__:
            raise CheckpointError(f"{where}: optimizer {i} is {saved_type}, the run uses {type(opt).__name__}")
        for gi, (g_new, g_old) in enumerate(zip(opt.param_groups, sd["param_groups"])):
            for p, pid in zip(g_new["params"], g_old["params"]):
                t = sd["state"].get(pid, {})
                for key, value in t.items():
                    # the parameter's shape, or a factored one (Muon's per-row/column second moment)
                    if isinstance(value, torch.Tensor) and value.ndim > 0 and (
                            value.ndim != p.ndim or any(v not in (1, n) for v, n in zip(value.shape, p.shape))):
                        raise CheckpointError(f"{where}: optimizer {i} group {gi} {key} has shape "
                                              f"{tuple(value.shape)}, the parameter is {tuple(p.shape)}")
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{where}: optimizer {i} ({saved_type}) does not fit: {e}") from e
