"""nanochat's native checkpoint layout, read and written.

nanochat saves `<base>/base_checkpoints/<tag>/model_<step>.pt` (the state dict, plain tensors),
`meta_<step>.json` (`model_config` and the step) and keeps its tokenizer in `<base>/tokenizer/`
(`tokenizer.pkl`, `token_bytes.pt`). `load_nanochat` opens such a folder (the one holding model_*.pt,
the folder above the model tags such as chatsft_checkpoints/ (the tag picked by nanochat's rule: the
largest d<depth>, then its last step; see pick_model_tag), or a base folder with one *_checkpoints/ folder)
into our GPT:

- weights through `torch.load(weights_only=True, mmap=True)`: nothing but tensors is unpickled and the
  file is mapped, not copied, until the shapes have been checked;
- names mapped (`transformer.wte` -> `wte`, `transformer.h.{l}` -> `blocks.{l}`, the rest kept; a
  torch.compile `_orig_mod.` prefix stripped); padded vocabulary rows kept, so writing back gives the
  same tensors;
- the architecture read from the tensors (resid_lambdas, smear, value embeddings => nanochat-2026-07,
  else nanochat-2025-10 with nanochat 2c4473d's bf16 rotary tables), and every shape `meta_*.json`
  implies compared with the file's before a model is allocated: a meta that disagrees is one line;
- the tokenizer through aquainterp.checkpoints.nanochat_tokenizer (a restricted unpickler).

`save_nanochat` writes our GPT back in that layout (`aquainterp export --format nanochat`).
"""

from __future__ import annotations

import json
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from aquainterp.checkpoints.native import CheckpointError, latest_step
from aquainterp.model.gpt import ARCH_2025_10, ARCH_2026_07, GPT, GPTConfig

MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
NANOCHAT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
TOKENIZER_DIRNAME = "tokenizer"


class NanochatCheckpointError(CheckpointError):
    """A nanochat checkpoint folder we cannot open: missing files, truncated .pt, meta vs tensors."""


def _model_files(directory: Path) -> dict[int, Path]:
    out = {}
    if directory.is_dir():
        for p in directory.iterdir():
            m = MODEL_RE.match(p.name)
            if m and p.is_file():
                out[int(m.group(1))] = p
    return out


CHECKPOINTS_SUFFIX = "_checkpoints"
DEPTH_TAG_RE = re.compile(r"d(\d+)")


def pick_model_tag(checkpoints_dir: Path) -> tuple[Path, str | None]:
    """nanochat's rule for a folder above the model tags (checkpoint_manager.find_largest_model): every
    sub-folder is a tag; tags that start with d<number> win, the largest number first; without any, the
    most recently modified tag. Ties (d4 and d04) go to the name sorted first, where nanochat keeps
    os.listdir's order. Returns (tag folder, why it was picked; None for the only tag). The tag is picked
    before its steps are looked at, as nanochat does: a largest tag without model_<step>.pt is an error,
    not a fallback to a smaller tag."""
    tags = sorted(p for p in checkpoints_dir.iterdir() if p.is_dir())
    if not tags:
        raise NanochatCheckpointError(f"{checkpoints_dir}: no model tags here (nanochat writes "
                                      f"<base>/{checkpoints_dir.name}/<tag>/model_<step>.pt, tag such as d20)")
    depths = [(int(m.group(1)), tag) for tag in tags if (m := DEPTH_TAG_RE.match(tag.name))]
    if depths:
        chosen = min(depths, key=lambda d: (-d[0], d[1].name))[1]
        why = f"largest depth tag of {', '.join(t.name for _, t in sorted(depths, key=lambda d: d[0]))}"
    else:
        chosen = min(tags, key=lambda t: (-t.stat().st_mtime, t.name))
        why = f"no d<depth> tag; most recently modified of {', '.join(t.name for t in tags)}"
    if not _model_files(chosen):
        others = [t.name for t in tags if t != chosen and _model_files(t)]
        hint = f"; tags with checkpoints: {', '.join(others)} (pass one of those folders)" if others else ""
        raise NanochatCheckpointError(f"{chosen}: the model tag nanochat would pick ({why}) holds no "
                                      f"model_<step>.pt{hint}")
    return chosen, (why if len(tags) > 1 else None)  # a lone tag is no choice: nothing to report


def resolve_folder(directory: str | Path) -> tuple[Path, str | None] | None:
    """(folder holding model_<step>.pt, how its tag was picked or None when given) for `directory`:
    - the tag folder itself (holds model_<step>.pt);
    - a folder above the tags (chatsft_checkpoints/, base_checkpoints/, ... or any folder whose sub-folders
      hold model_<step>.pt): the tag by nanochat's rule (pick_model_tag);
    - a nanochat base folder holding one *_checkpoints/ folder with checkpoints: the same, inside it.
    None when `directory` is not a nanochat checkpoint folder. Several *_checkpoints/ folders with
    checkpoints (base and sft, say) are an error that lists them: which stage to open is the user's choice
    (nanochat's -i base|sft|rl)."""
    directory = Path(directory)
    if _model_files(directory):
        return directory, None
    if not directory.is_dir():
        return None
    subdirs = [p for p in directory.iterdir() if p.is_dir()]
    ours = directory.name.endswith(CHECKPOINTS_SUFFIX) and latest_step(directory) is not None  # our step_*/ folders
    if any(_model_files(p) for p in subdirs) or (directory.name.endswith(CHECKPOINTS_SUFFIX) and not ours):
        return pick_model_tag(directory)
    stages = sorted(p for p in subdirs if p.name.endswith(CHECKPOINTS_SUFFIX)
                    and any(_model_files(t) for t in p.iterdir() if t.is_dir()))
    if len(stages) > 1:
        raise NanochatCheckpointError(f"{directory}: holds several nanochat stages "
                                      f"({', '.join(p.name for p in stages)}); pass one of those folders")
    return pick_model_tag(stages[0]) if stages else None


def checkpoint_folder(directory: str | Path) -> Path | None:
    """The folder holding model_<step>.pt for `directory` (see resolve_folder), or None when it is not a
    nanochat checkpoint folder."""
    resolved = resolve_folder(directory)
    return None if resolved is None else resolved[0]


def is_nanochat_dir(directory: str | Path) -> bool:
    try:
        return checkpoint_folder(directory) is not None
    except NanochatCheckpointError:
        return True  # it is one (several, in fact): load_nanochat will say which to pick


def state_from_nanochat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nanochat parameter names -> ours."""
    out = {}
    for name, tensor in state.items():
        name = name.removeprefix("_orig_mod.")
        if name.startswith("transformer.wte."):
            name = name.removeprefix("transformer.")
        elif name.startswith("transformer.h."):
            name = "blocks." + name.removeprefix("transformer.h.")
        out[name] = tensor
    return out


def state_to_nanochat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> nanochat's."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("wte."):
            name = "transformer." + name
        elif name.startswith("blocks."):
            name = "transformer.h." + name.removeprefix("blocks.")
        out[name] = tensor
    return out


def config_from_nanochat(model_config: dict, state: dict[str, torch.Tensor], where: str) -> GPTConfig:
    """GPTConfig for nanochat's meta model_config, the architecture and vocab padding read from the tensors."""
    if not isinstance(model_config, dict):
        raise NanochatCheckpointError(f"{where}: model_config must be a JSON object")
    missing = [k for k in NANOCHAT_CONFIG_KEYS if k not in model_config]
    extra = sorted(set(model_config) - {*NANOCHAT_CONFIG_KEYS, "window_pattern"})
    if missing or extra:
        raise NanochatCheckpointError(f"{where}: model_config lacks {missing} / has unknown keys {extra}")
    is_2026 = "resid_lambdas" in state
    pattern = model_config.get("window_pattern")
    if not is_2026 and pattern not in (None, "L"):
        raise NanochatCheckpointError(f"{where}: meta says window_pattern {pattern!r} but the tensors are the "
                                      f"{ARCH_2025_10} architecture (no resid_lambdas/smear/value embeddings)")
    kwargs = {k: model_config[k] for k in NANOCHAT_CONFIG_KEYS}
    from aquainterp.checkpoints.guard import LIMITS

    for k, v in kwargs.items():  # before any shape is derived from them
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= LIMITS.get(k, 1 << 30):
            raise NanochatCheckpointError(f"{where}: model_config {k} = {v!r} is not an int in [1, {LIMITS.get(k, 1 << 30)}]")
    wte = state.get("wte.weight")
    if wte is None or wte.ndim != 2:
        raise NanochatCheckpointError(f"{where}: no 2-D transformer.wte.weight tensor")
    vocab = kwargs["vocab_size"]
    if isinstance(vocab, int) and wte.shape[0] == vocab:
        pad = 64 if vocab % 64 == 0 else 1
    else:
        pad = 64  # nanochat pads to a multiple of 64; the shape check below catches anything else
    try:
        if is_2026:
            return GPTConfig(**kwargs, architecture=ARCH_2026_07, window_pattern=pattern or "L", pad_vocab_size_to=pad)
        # nanochat 2c4473d (2026-01) keeps its rotary tables in bf16: reproduce its numbers
        return GPTConfig(**kwargs, architecture=ARCH_2025_10, pad_vocab_size_to=pad, rotary_dtype="bfloat16")
    except (TypeError, ValueError) as e:
        raise NanochatCheckpointError(f"{where}: bad model_config: {e}") from e


def config_to_nanochat(config: GPTConfig) -> dict:
    """nanochat's model_config for our config; refuses what nanochat's GPT cannot express."""
    problems = []
    if config.mlp_hidden not in (None, 4 * config.n_embd):
        problems.append(f"mlp_hidden {config.mlp_hidden} (nanochat's MLP is 4 × n_embd)")
    if config.norm_eps is not None:
        problems.append(f"norm_eps {config.norm_eps} (nanochat uses torch's default)")
    expected_base = 100000.0 if config.is_2026 else 10000.0
    if config.rope_base != expected_base:
        problems.append(f"rope_base {config.rope_base:g} (nanochat's {config.architecture} uses {expected_base:g})")
    if problems:
        raise NanochatCheckpointError("cannot write a nanochat checkpoint: " + "; ".join(problems))
    out = {k: getattr(config, k) for k in NANOCHAT_CONFIG_KEYS}
    if config.is_2026:
        out["window_pattern"] = config.window_pattern
    return out


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, nothing allocated
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _read_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-zip) torch.save file cannot be mapped: read it
            if "mmap" not in str(e) or zipfile.is_zipfile(path):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanochatCheckpointError(f"{path}: refused by torch.load(weights_only=True): {first}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanochatCheckpointError(f"{path}: cannot read ({msg}); the file is truncated or not a "
                                      "torch.save'd state dict") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise NanochatCheckpointError(f"{path}: holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def read_nanochat(directory: str | Path, step: int | None = None):
    """(GPTConfig, our-named state dict (mmapped), meta, checkpoint folder) for a nanochat checkpoint."""
    given = Path(directory)
    if not given.exists():
        raise NanochatCheckpointError(f"{given}: does not exist")
    resolved = resolve_folder(given)
    if resolved is None:
        raise NanochatCheckpointError(f"{given}: no nanochat checkpoint (model_<step>.pt) here")
    folder, why = resolved
    files = _model_files(folder)
    if step is None:
        step = max(files)
    if why is not None:  # nanochat logs its guess too ("No model tag provided, guessing model tag: d12")
        print(f"nanochat checkpoint: model tag {folder.name} ({why}) in {folder.parent}, step {step}"
              f"{' (the last)' if step == max(files) else ''}", file=sys.stderr)
    if step not in files:
        raise NanochatCheckpointError(f"{folder}: no model_{step:06d}.pt; steps here: {sorted(files)}")
    meta_path = folder / f"meta_{step:06d}.json"
    if not meta_path.is_file():
        raise NanochatCheckpointError(f"{meta_path}: missing (nanochat writes it beside model_{step:06d}.pt)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanochatCheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise NanochatCheckpointError(f"{meta_path}: no model_config")
    state = state_from_nanochat(_read_pt(files[step]))
    config = config_from_nanochat(meta["model_config"], state, str(meta_path))
    expected = _expected_shapes(config)
    problems = [f"{'missing' if k not in state else 'unexpected'} {k}" for k in sorted(set(expected) ^ set(state))]
    problems += [f"{k} is {tuple(state[k].shape)}, meta implies {expected[k]}"
                 for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... {len(problems) - 4} more" if len(problems) > 4 else "")
        raise NanochatCheckpointError(f"{meta_path}: model_config disagrees with {files[step].name}: {shown}")
    return config, state, meta, folder


def find_tokenizer_dir(folder: Path) -> Path | None:
    """nanochat keeps the tokenizer at <base>/tokenizer/, two levels above <base>/base_checkpoints/<tag>/."""
    for candidate in (folder / TOKENIZER_DIRNAME, folder.parent / TOKENIZER_DIRNAME,
                      folder.parent.parent / TOKENIZER_DIRNAME):
        if (candidate / "tokenizer.pkl").is_file():
            return candidate
    return None


def load_nanochat(directory: str | Path, step: int | None = None, device="cpu"):
    """(GPT in eval mode, Tokenizer or None, meta) from a nanochat checkpoint folder."""
    config, state, meta, folder = read_nanochat(directory, step)
    with torch.device(device):
        model = GPT(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = None
    tok_dir = find_tokenizer_dir(folder)
    if tok_dir is not None:
        from aquainterp.checkpoints.nanochat_tokenizer import NanochatTokenizerError, load_nanochat_tokenizer

        try:
            tokenizer = load_nanochat_tokenizer(tok_dir)
        except NanochatTokenizerError as e:
            raise NanochatCheckpointError(str(e)) from e
        if tokenizer.vocab_size != config.vocab_size:
            raise NanochatCheckpointError(f"{tok_dir / 'tokenizer.pkl'}: {tokenizer.vocab_size} tokens, the model's "
                                          f"vocab_size is {config.vocab_size}")
        if hasattr(model, "set_tokenizer"):  # to_tokens / string input, as load_model does
            model.set_tokenizer(tokenizer)
    meta = dict(meta)
    meta.setdefault("nanochat_checkpoint", str(folder))
    return model, tokenizer, meta


# The folder nanochat's checkpoint_manager.load_model(source) reads for each kind of model (its
# `chat_cli -i base|sft|rl`; mid_checkpoints is the midtraining stage of nanochat versions that have one).
NANOCHAT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                 "rl": "chatrl_checkpoints"}


def nanochat_base_dir() -> Path:
    """Where nanochat keeps its checkpoints: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat (its get_base_dir)."""
    import os

    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def source_folder(source: str, model_tag: str | None = None, base: str | Path | None = None) -> Path:
    """The folder nanochat's `-i base|mid|sft|rl [-g TAG]` opens: <base>/<stage>_checkpoints[/<tag>], base from
    nanochat_base_dir() unless given. Without a tag, load_model picks one as nanochat does (pick_model_tag)."""
    if source not in NANOCHAT_DIRS:
        raise ValueError(f"nanochat source must be one of {', '.join(NANOCHAT_DIRS)}, got {source!r}")
    folder = Path(base) if base is not None else nanochat_base_dir()
    folder = folder / NANOCHAT_DIRS[source]
    if not folder.is_dir():
        raise NanochatCheckpointError(f"{folder}: no such folder (nanochat's -i {source} reads it; the base folder "
                                      "is $NANOCHAT_BASE_DIR, else ~/.cache/nanochat)")
    if model_tag is not None:
        if not (folder / model_tag).is_dir():
            tags = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise NanochatCheckpointError(f"{folder / model_tag}: no such model tag (tags here: "
                                          f"{', '.join(tags) or 'none'})")
        folder = folder / model_tag
    return folder


def save_nanochat(model: GPT, out: str | Path, step: int, tokenizer=None, tag: str | None = None,
                  meta_extra: dict | None = None, kind: str = "base") -> Path:
    """Write `out`/<kind's folder>/<tag>/model_<step>.pt + meta_<step>.json and `out`/tokenizer/ (when a
    tokenizer is given): the layout nanochat's checkpoint_manager reads, in the folder NANOCHAT_DIRS names
    for `kind` (base_checkpoints, chatsft_checkpoints, ...). Returns the checkpoint folder."""
    if kind not in NANOCHAT_DIRS:
        raise ValueError(f"save_nanochat: kind must be one of {', '.join(NANOCHAT_DIRS)}, got {kind!r}")
    model_config = config_to_nanochat(model.config)
    tag = tag or f"d{model.config.n_layer}"
    folder = Path(out) / NANOCHAT_DIRS[kind] / tag
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_to_nanochat(model.state_dict()).items()}
    padded = -(-model.config.vocab_size // 64) * 64  # nanochat's GPT always pads its vocabulary to 64
    for name, tensor in state.items():
        if (name in ("transformer.wte.weight", "lm_head.weight") or name.startswith("value_embeds.")) \
                and tensor.size(0) < padded:
            state[name] = torch.cat([tensor, tensor.new_zeros(padded - tensor.size(0), tensor.size(1))])
    torch.save(state, folder / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": model_config, **(meta_extra or {})}
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        from aquainterp.checkpoints.nanochat_tokenizer import write_tokenizer_pkl

        write_tokenizer_pkl(tokenizer, Path(out) / TOKENIZER_DIRNAME)
    return folder


# ---------------------------------------------------------------- `aquainterp import-nanochat`


def add_arguments(parser) -> None:
    from aquainterp.cli.args import count_int, existing_path
    from aquainterp.cli.rundir import output_path

    parser.add_argument("checkpoint", type=existing_path("dir"),
                        help="nanochat checkpoint folder (base_checkpoints/<tag>/ with model_<step>.pt and "
                             "meta_<step>.json), the folder above the tags (the largest tag, as nanochat picks "
                             "it), or a nanochat base folder with one *_checkpoints/ folder")
    parser.add_argument("out_dir", type=output_path("dir"),
                        help="new (or empty) folder for the aquainterp checkpoint (step_XXXXXX/)")
    parser.add_argument("--step", type=count_int(), default=None, help="checkpoint step (default: the latest)")


def run(args) -> int:
    from aquainterp.checkpoints.native import save_checkpoint
    from aquainterp.cli.rundir import HIDDEN, UsageError, claim_output

    claim_output(args.out_dir, "out_dir", owner="aquainterp import-nanochat", kind="dir", inputs=[args.checkpoint],
                 overwrite=None)
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(p.name not in HIDDEN for p in out.iterdir())):
        raise UsageError(f"out_dir {out} exists and is not an empty folder; import-nanochat writes a new one")
    if not is_nanochat_dir(args.checkpoint):
        raise UsageError(f"{args.checkpoint}: no nanochat checkpoint (model_<step>.pt) here")
    model, tokenizer, meta = load_nanochat(args.checkpoint, args.step)
    step = int(meta.get("step", args.step or 0))
    path = save_checkpoint(out, step, model, None, {"imported_from": str(meta["nanochat_checkpoint"]),
                                                    "nanochat_meta": {k: v for k, v in meta.items()
                                                                      if k != "nanochat_checkpoint"}},
                           tokenizer=tokenizer)
    print(f"wrote {path} ({model.config.architecture}, {model.num_params():,} parameters"
          f"{', with tokenizer' if tokenizer is not None else ', no tokenizer found'})")
    return 0
