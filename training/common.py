"""The parts every training stage shares: processes, devices, seeds, checkpoints, safety, progress, metrics.

A stage (base, mid, sft, and the RL stage) is: parse flags -> a config dataclass -> `run(config)`.
Inside `run` it calls these helpers in this order:

    dist = setup_distributed(config.device)          # torchrun env -> process group (NCCL/gloo)
    seed_everything(config.seed)
    logger = open_logger(run_dir, config, dist)      # aquainterp.logger.Logger, rank 0 writes
    start = resume(ckpt_dir, model, optimizers)       # --resume: model, optimizer, RNG, data position
    ... loop: autocast(dist.device, bf16); check_finite(loss, ...); progress.update(...) ...
    save(ckpt_dir, step, model, optimizers, meta, dist)   # rank 0 writes; everyone waits
    teardown_distributed()
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from aquainterp.checkpoints.native import (
    CheckpointError,
    latest_step,
    load_checkpoint,
    load_optimizers,
    load_state_into,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from aquainterp.model.gpt import unwrap


@dataclass
class LearningRates:
    """The optimizer settings base, mid and SFT share (nanochat's defaults; training.optim)."""

    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    optimizer: str = "auto"


@dataclass
class RunSettings:
    """Run management base, mid and SFT share: checkpoint cadence, device and precision, seed, what to do
    with an earlier run in run_dir, W&B."""

    save_every: int = 1000
    device: str = "auto"
    bf16: str = "auto"
    compile: str = "auto"
    seed: int = 42
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's checkpoints + metrics in run_dir
    skip_nonfinite: bool = False
    wandb: str = "disabled"
    run_name: str | None = None


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint of the bad state."""


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda'/'cpu'/'mps' are checked so typos fail early."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    return torch.device(name)


def setup_distributed(device: str = "auto") -> Dist:
    """One process (plain python) or one of WORLD_SIZE processes started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown_distributed() -> None:
    """Called from `finally`. On a clean exit the ranks meet at a barrier first: a gloo rank that
    destroys its group while a peer is still working (rank 0 saving a checkpoint, say) can abort in
    C++ ("terminate called without an active exception"). While an exception is propagating the
    barrier is skipped, since the failed rank's peers may never arrive and it would hang."""
    if torch_dist.is_initialized():
        if sys.exc_info()[0] is None:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch_dist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere (CPU runs stay fp32 and exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_flag(value: str, device: torch.device, what: str) -> bool:
    """--bf16/--compile take auto|on|off; auto means on with a GPU."""
    if value not in ("auto", "on", "off"):
        raise ValueError(f"--{what} must be auto, on or off, got {value!r}")
    return device.type == "cuda" if value == "auto" else value == "on"


def grads_finite(model) -> bool:
    """True when every gradient is finite (one device sync). A finite loss can still have inf/NaN
    gradients (an overflow in backward); applying them would poison the weights and the next checkpoint."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())


def check_finite(loss: float, step: int, skip: bool, ckpt_dir: Path, grads_ok: bool = True) -> bool:
    """True if the step may be applied. NaN/inf loss or gradients: raise (default) or return False
    (--skip-nonfinite)."""
    if math.isfinite(loss) and grads_ok:
        return True
    what = f"training loss is {loss}" if not math.isfinite(loss) else \
        f"gradients contain NaN/inf (the loss {loss:.4g} is finite)"
    if skip:
        print(f"step {step}: {what}; skipping this update (--skip-nonfinite)")
        return False
    last = latest_step(ckpt_dir)
    kept = f"the last good checkpoint is {ckpt_dir}/step_{last:06d}" if last is not None else "no checkpoint was written yet"
    raise NonFiniteLossError(f"step {step}: {what}; stopped before applying the update, {kept}. "
                             "Lower the learning rate or resume from it with --resume (--skip-nonfinite skips such steps).")


def run_cli(run, config, prog: str, debug: bool | None = None):
    """Run a stage from its command line (aquainterp.cli.args.guarded): a usage error (a run dir holding
    an earlier run, a missing data file) ends with one line on stderr and exit status 2, a runtime
    failure (a corrupt, mismatched or unwritable checkpoint, e.g. a full disk; a non-finite loss) with
    one line and exit status 1; the traceback only with --debug."""
    from aquainterp.cli.args import guarded, pop_debug

    if debug is None:
        debug = pop_debug(sys.argv[1:])[1]
    result = {}

    def body() -> int:
        result["value"] = run(config)
        return 0

    code = guarded(prog, body, debug)
    if code:
        sys.exit(code)
    return result.get("value")


def claim_run_dir(config, run_dir: str | None = None, flag: str = "--run-dir"):
    """aquainterp.cli.rundir.claim_run_dir for a stage's config (--resume / --overwrite), with the stage's
    inputs (--init-from, --checkpoint, --tokenizer-dir, --data): every rank checks, rank 0 takes the run
    folder's lock (returned; the stage releases it when it ends) and deletes with --overwrite, which never
    reaches the stage's own inputs inside this run's checkpoints/."""
    from aquainterp.cli.rundir import RunDirError, inside
    from aquainterp.cli.rundir import claim_run_dir as claim

    run_dir = run_dir or config.run_dir
    inputs = [getattr(config, name, None) for name in ("init_from", "checkpoint", "tokenizer_dir", "data")]
    if config.overwrite:
        for name in ("init_from", "checkpoint", "tokenizer_dir"):
            given = getattr(config, name, None)
            if given and inside(Path(run_dir) / "checkpoints", given):
                raise RunDirError(f"--overwrite would delete --{name.replace('_', '-')} {given}, which lies in "
                                  f"{Path(run_dir) / 'checkpoints'}; choose another {flag}")
    return claim(run_dir, resume=config.resume, overwrite=config.overwrite, flag=flag,
                 is_main=int(os.environ.get("RANK", "0")) == 0,
                 command=f"python -m {type(config).__module__}", inputs=[i for i in inputs if isinstance(i, str | Path)])


def config_dict(config) -> dict:
    d = asdict(config) if is_dataclass(config) else dict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def open_logger(run_dir: Path, config, dist: Dist, wandb_mode: str, run_name: str | None = None,
                truncate_from: int | None = None):
    """aquainterp.logger.Logger; metrics.jsonl in run_dir, W&B by mode; inactive on ranks > 0. On --resume,
    `truncate_from` is the first step the resumed run logs again: rows from it on (logged after the
    checkpoint) are moved aside and the W&B run continues under its id (aquainterp.logger)."""
    from aquainterp.logger import Logger

    return Logger(run_dir, run_name=run_name, mode=wandb_mode, config=config_dict(config), rank=dist.rank,
                  truncate_from=truncate_from)




def clean_stale_temp(ckpt_dir: Path, dist: Dist) -> None:
    """Remove temp folders of checkpoint writes that a crash interrupted (never complete checkpoints)."""
    if dist.is_main and ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith((".tmp_step_", ".old_step_")):
                shutil.rmtree(p, ignore_errors=True)
    barrier(dist)


def save(ckpt_dir: Path, step: int, model, optimizers, meta: dict, dist: Dist, tokenizer=None) -> None:
    """Rank 0 writes model + optimizer + meta (with RNG state); the other ranks wait for it."""
    if dist.is_main:
        save_checkpoint(ckpt_dir, step, unwrap(model), optimizers, {**meta, "rng": rng_state(),
                                                                      "world_size": dist.world_size},
                        tokenizer=tokenizer)
    barrier(dist)


def resume(ckpt_dir: Path, model, optimizers, device, tokenizer=None) -> tuple[int, dict] | None:
    """Restore the latest checkpoint of this run (model, optimizers keeping the configured lrs, RNG).

    Returns (step, meta) or None when the run has no checkpoint yet. Every rank reads the same files.
    With `tokenizer`, refuses a checkpoint trained with another tokenizer (same vocabulary size or not).
    """
    step = latest_step(ckpt_dir)
    if step is None:
        return None
    ckpt = load_checkpoint(ckpt_dir, step, device=str(device))
    expected = ckpt.meta.get("tokenizer_fingerprint")
    if tokenizer is not None and expected is not None and tokenizer.fingerprint() != expected:
        raise CheckpointError(f"tokenizer fingerprint {tokenizer.fingerprint()[:12]} differs from "
                              f"{ckpt.path / 'meta.json'}'s {expected[:12]}: this run's tokenizer is not the one "
                              "the checkpoint was trained with")
    load_state_into(unwrap(model), ckpt.model_state, ckpt.path)
    initial = [[g["initial_lr"] for g in opt.param_groups] for opt in optimizers]
    load_optimizers(optimizers, ckpt)
    for opt, lrs in zip(optimizers, initial):  # the flags of this invocation set the learning rates
        for g, lr in zip(opt.param_groups, lrs):
            g["initial_lr"] = lr
    set_rng_state(ckpt.meta["rng"])
    return step, ckpt.meta


def init_from(directory: Path, device) -> tuple:
    """(model, tokenizer, meta) from a previous stage's checkpoints (its latest step)."""
    from aquainterp.checkpoints.load import load_model

    model, tokenizer, meta = load_model(directory, None, device=str(device))
    if tokenizer is None:
        raise ValueError(f"--init-from {directory}: the checkpoint has no tokenizer/ folder")
    model.train()
    return model, tokenizer, meta


class Progress:
    """A tqdm bar on rank 0 showing loss, tokens/s and ETA (tqdm computes the ETA from the step rate)."""

    def __init__(self, start: int, total: int, dist: Dist, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not (dist.is_main and enabled),
                        dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def tick(self) -> float:
        """Seconds since the last tick."""
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt

    def update(self, loss: float, tokens_per_sec: float, **extra) -> None:
        post = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_sec:,.0f}"}
        post.update({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in extra.items()})
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


FLAG_CHOICES = {"optimizer": ("auto", "nanochat-2025-10", "nanochat-2026-07"),
                "wandb": ("online", "offline", "disabled"), "bf16": ("auto", "on", "off"),
                "compile": ("auto", "on", "off"), "device": ("auto", "cpu", "cuda", "mps"),
                "architecture": ("nanochat-2025-10", "nanochat-2026-07")}


def flag_types() -> dict:
    """Each stage flag's parser: numbers with their range, paths that must exist, devices that must be
    present. Checked while parsing, so a typo (`--max-steps -5`, `--matrix-lr nan`, a missing
    `--init-from`) is one line and exit 2 before anything starts. Fields not listed get the parser's
    sanity range (aquainterp.cli.args.OneLineParser)."""
    from aquainterp.cli.args import (
        SEED,
        Number,
        count_int,
        data_source,
        device_name,
        existing_path,
        positive_int,
    )
    from aquainterp.cli.rundir import output_path

    lr = Number(float, 0.0, 1e3, lo_open=True)
    fraction = Number(float, 0.0, 1.0)
    return {
        # sizes
        "depth": positive_int(1024), "aspect_ratio": positive_int(1 << 16), "head_dim": Number(int, 2, 1 << 16),
        "seq_len": Number(int, 2, 1 << 20), "device_batch_size": positive_int(1 << 20),
        "total_batch_tokens": positive_int(), "examples_per_step": positive_int(1 << 24),
        "vocab_size": Number(int, 512, 1 << 16), "max_chars": positive_int(), "doc_cap": positive_int(),
        # how long (the -1 defaults mean "auto" and are not flags one can type)
        "max_steps": positive_int(1 << 30, "omit for the automatic step count"),
        "num_epochs": positive_int(1 << 20), "target_param_data_ratio": Number(float, 0.0, 1e6, lo_open=True),
        "aqua_limit": positive_int(what="omit for all rows"), "gsm8k_limit": positive_int(what="omit for all rows"),
        # optimizer
        "matrix_lr": lr, "embedding_lr": lr, "unembedding_lr": lr, "weight_decay": Number(float, 0.0, 10.0),
        "warmup_ratio": fraction, "warmdown_ratio": fraction, "final_lr_frac": fraction,
        "init_lr_frac": Number(float, 0.0, 1.0, lo_open=True),
        # cadence and sizes of evaluation (0 = off where it says so)
        "eval_every": count_int(what="0 = only at the end"), "save_every": count_int(what="0 = only at the end"),
        "val_docs": positive_int(1 << 24), "eval_docs": count_int(1 << 24), "eval_synthetic": count_int(1 << 24),
        "synthetic": count_int(1 << 30), "synthetic_difficulty": Number(int, 0, 3, what="0 = the task's mix"),
        "seed": SEED, "synthetic_seed": SEED,
        # paths and devices
        "init_from": _as_str(existing_path("dir")), "tokenizer_dir": _as_str(existing_path("dir")),
        "run_dir": output_path("run"), "out_dir": output_path("dir"),
        "aqua": data_source, "gsm8k": data_source, "eval_aqua": data_source, "val_data": _text_source,
        "data": _text_source, "device": device_name,
    }


def _as_str(parse):
    """A path type whose value stays a str (configs are stored as JSON in every checkpoint)."""
    wrapped = lambda text: str(parse(text))
    wrapped.__name__ = "path"
    return wrapped


def _text_source(text: str) -> str:
    """--data of base/tok_train: synthetic[:SEED[:DIFFICULTY]], hf:NAME[:CONFIG] or a local path."""
    if text == "synthetic" or text.startswith(("synthetic:", "hf:")) or Path(text).exists():
        return text
    raise argparse.ArgumentTypeError(f"{text}: no such file or folder (and not synthetic[:SEED[:DIFFICULTY]] "
                                     "or hf:NAME[:CONFIG])")


# What each stage setting means, once for every stage that has it (the same name means the same thing in
# tok_train, base, mid and sft). A stage field missing here fails tests/test_settings.py.
FLAG_HELP = {
    # where things are
    "run_dir": "run folder: checkpoints/, metrics.jsonl, the W&B run",
    "out_dir": "folder the tokenizer is written to (tokenizer.json, compression.json)",
    "tokenizer_dir": "tokenizer folder written by training.tok_train",
    "init_from": "checkpoint folder to start from (its latest step)",
    "data": "training text: synthetic[:SEED[:DIFFICULTY]], hf:NAME[:CONFIG] or a local file/folder",
    "text_field": "the JSON field / parquet column of a local --data file that holds each document's text",
    "val_data": "validation text, same forms as --data (default: the first --val-docs documents of --data, held "
                "out of training; the same source as --data is held out the same way)",
    "val_docs": "validation documents for the bits-per-byte eval",
    "eval_docs": "held-out documents for the bytes-per-token report of each task",
    "synthetic": "synthetic problems in the mixture (0 = none)",
    "synthetic_seed": "seed of the synthetic problems",
    "synthetic_difficulty": "synthetic difficulty 1-3 (0 = the task's mix of levels)",
    "aqua": "AQuA-RAT source: a local JSON Lines file or a Hub id such as deepmind/aqua_rat (default: none)",
    "aqua_split": "AQuA-RAT split when --aqua is a Hub id",
    "aqua_limit": "use at most this many AQuA rows",
    "gsm8k": "GSM8K source: a local JSON Lines file or a Hub id such as openai/gsm8k (default: none)",
    "gsm8k_split": "GSM8K split when --gsm8k is a Hub id",
    "gsm8k_limit": "use at most this many GSM8K rows",
    "styles": "comma list of answer styles the conversations use: direct, reasoning, checked",
    "eval_synthetic": "held-out synthetic problems for the categorical accuracy eval (0 = none)",
    "eval_aqua": "AQuA source for the categorical accuracy eval (local file or Hub id; default: none)",
    # the model and the tokenizer
    "vocab_size": "tokenizer vocabulary size, special tokens included",
    "max_chars": "characters of --data to train the tokenizer on",
    "doc_cap": "characters kept of each document (nanochat's cap)",
    "depth": "transformer layers; the width is depth x --aspect-ratio",
    "architecture": "nanochat-2025-10 (HF NanoChat / TransformerBridge can load it) or nanochat-2026-07 "
                    "(nanochat HEAD: sliding windows, value embeddings, smear, backout)",
    "aspect_ratio": "model width per layer (width = depth x aspect ratio)",
    "head_dim": "attention head size (heads = width / head_dim)",
    "seq_len": "tokens per training sequence",
    # how much
    "device_batch_size": "sequences per forward/backward on each device (gradient accumulation makes up the rest)",
    "total_batch_tokens": "tokens per optimizer step, all devices together",
    "examples_per_step": "conversations per optimizer step, all devices together",
    "num_epochs": "passes over the mixture",
    "max_steps": "optimizer steps",
    "target_param_data_ratio": "training tokens per parameter when --max-steps is omitted (Chinchilla: 20)",
    # optimizer
    "matrix_lr": "Muon learning rate of the transformer's matrices",
    "embedding_lr": "AdamW learning rate of the token embedding",
    "unembedding_lr": "AdamW learning rate of lm_head",
    "weight_decay": "Muon's cautious weight decay (nanochat's --weight_decay; AdamW's is the optimizer recipe's)",
    "optimizer": "optimizer recipe: auto = the architecture's, nanochat 2c4473d's Muon + AdamW for 2025-10, "
                 "nanochat HEAD's for 2026-07 (training/optim.py)",
    "init_lr_frac": "fraction of the learning rates to start from",
    "warmup_ratio": "fraction of the steps spent warming the learning rate up",
    "warmdown_ratio": "fraction of the steps at the end spent decaying the learning rate",
    "final_lr_frac": "learning rate at the last step, as a fraction of the peak",
    # cadence and run management
    "eval_every": "evaluate every N steps (0 = only at the end)",
    "save_every": "save a checkpoint every N steps (0 = only at the end)",
    "device": "auto | cpu | cuda | mps",
    "bf16": "bf16 autocast (auto = on with a GPU)",
    "compile": "torch.compile the model (auto = on with a GPU)",
    "seed": "seed of the model init and the data order",
    "resume": "continue exactly from the latest checkpoint in the run folder",
    "overwrite": "replace what an earlier run wrote in the output folder (a stage's checkpoints and metrics, "
                 "tok_train's tokenizer files)",
    "skip_nonfinite": "skip a step whose loss or gradients are NaN/inf instead of stopping the run",
    "wandb": "W&B logging: online, offline (sync later) or disabled",
    "run_name": "W&B run name",
}


def flag_order(cls) -> list[str]:
    """A stage config's field names, the stage's own first, then those of each class it inherits
    (MixtureSettings, LearningRates, RunSettings) in that order: the order of its --help."""
    origin = {}
    for klass in reversed(cls.__mro__):  # a field belongs to the first class that declares it
        for name in getattr(klass, "__annotations__", {}):
            origin.setdefault(name, klass)
    rank = {klass: i for i, klass in enumerate(cls.__mro__)}
    names = [f.name for f in fields(cls)]
    return sorted(names, key=lambda n: rank[origin[n]])


def add_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """One flag per config field, kebab-case (snake_case accepted by normalize_flag_spelling), with its
    type and range (flag_types) and its meaning (FLAG_HELP)."""
    types = flag_types()
    for name in flag_order(type(defaults)):
        value = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        meaning = FLAG_HELP.get(name, "")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", help=f"{meaning} (default: off)".strip())
        else:
            kind = types.get(name, type(value) if value is not None else str)
            shown = "auto" if name == "max_steps" and value == -1 else \
                "all" if name.endswith("_limit") and value == -1 else value
            parser.add_argument(flag, type=kind, default=value, choices=FLAG_CHOICES.get(name),
                                help=f"{meaning} (default: {shown})".strip())


def stage_main(run, cls, doc: str, module: str, argv: list[str] | None = None):
    """`python -m <module>`: flags -> cls (parse_config), then run it at the command-line boundary (run_cli)."""
    prog = f"python -m {module}"
    return run_cli(run, parse_config(cls, argv, doc.split("\n")[0], prog=prog), prog)


def stage_parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """The command line parser of a stage config class (its flags, plus --debug)."""
    from aquainterp.cli.args import OneLineParser

    parser = OneLineParser(prog=prog, description=description)
    add_arguments(parser, cls())
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def parse_config(cls, argv: list[str] | None, description: str, prog: str | None = None):
    """Flags -> config dataclass; `prog` is how the usage line names the command. Errors: one line, exit 2."""
    from aquainterp.cli.args import pop_debug
    from aquainterp.cli.main import normalize_flag_spelling

    parser = stage_parser(cls, description, prog)
    argv = pop_debug(list(sys.argv[1:] if argv is None else argv))[0]
    args = parser.parse_args(normalize_flag_spelling(argv))
    del args.debug
    return cls(**vars(args))
