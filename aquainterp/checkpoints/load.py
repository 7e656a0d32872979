"""Open any checkpoint folder as (GPT, tokenizer, meta): ours (checkpoints/native.py) or nanochat's own
layout (checkpoints/nanochat.py). The one place that knows both formats, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aquainterp.checkpoints.guard import preflight
from aquainterp.checkpoints.native import (
    META_FILE,
    MODEL_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    latest_step,
    load_checkpoint,
    load_state_into,
    step_dir,
)


def load_model(directory, step: int | None = None, device="cpu"):
    """(GPT, Tokenizer or None, meta) from a checkpoint folder written by save_checkpoint; the tokenizer is
    also attached to the model (model.tokenizer, model.to_tokens ...)."""
    chosen = step if step is not None else latest_step(directory)
    if chosen is not None and (step_dir(directory, chosen) / META_FILE).is_file():
        preflight(step_dir(directory, chosen))  # model_config vs bounds and the weights' header: allocates nothing
    # imported after the preflight: the model pulls in transformer_lens (seconds), and a hostile meta.json must
    # be refused at once (tests/reliability/test_user_errors.py, "fails fast")
    from aquainterp.checkpoints.nanochat import is_nanochat_dir, load_nanochat
    from aquainterp.model.gpt import GPT, GPTConfig

    if is_nanochat_dir(directory):  # nanochat's own layout: model_<step>.pt + meta_<step>.json (+ tokenizer.pkl)
        return load_nanochat(directory, step, device)
    ckpt = load_checkpoint(directory, step, device)
    if "model_config" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path / META_FILE}: no 'model_config'; cannot rebuild the model")
    try:
        config = GPTConfig.from_dict(ckpt.meta["model_config"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt.path / META_FILE}: bad model_config: {e}") from e
    with torch.device(device):
        model = GPT(config)
    load_state_into(model, ckpt.model_state, ckpt.path / MODEL_FILE)
    model.eval()
    tokenizer = None
    if (ckpt.path / TOKENIZER_DIR).is_dir():
        from aquainterp.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(ckpt.path / TOKENIZER_DIR)
        expected = ckpt.meta.get("tokenizer_fingerprint")
        if expected is not None and tokenizer.fingerprint() != expected:
            raise CheckpointError(f"{ckpt.path / TOKENIZER_DIR}: fingerprint {tokenizer.fingerprint()[:12]} "
                                  f"differs from meta's {expected[:12]}")
        try:  # model.to_tokens / to_str_tokens / string input, as on a TransformerLens model
            model.set_tokenizer(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path / TOKENIZER_DIR}: {e}") from e
    return model, tokenizer, ckpt.meta


def checkpoint_argument(checkpoint: Path | None, source: str | None, model_tag: str | None) -> Path | None:
    """The checkpoint folder a command's --checkpoint, or nanochat's -i [-g TAG], names (chat and eval take
    both): -g without -i is a usage error."""
    if source is not None:  # nanochat.py imports the model (transformer_lens): only when -i asks for it
        from aquainterp.checkpoints.nanochat import source_folder

        return source_folder(source, model_tag)
    if model_tag is not None:
        from aquainterp.cli.rundir import UsageError

        raise UsageError("-g/--model-tag goes with -i; with --checkpoint name the tag's folder itself")
    return checkpoint
