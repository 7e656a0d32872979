"""aquainterp: train nanochat's GPT on AQuA-style multiple-choice math and watch its insides.

The library package, in named parts: model/ (the GPT and its TransformerLens surface), checkpoints/
(formats and loading), patching/, cli/ (entry point and plumbing), tasks/, plus tokenizer.py (a Rust
core behind a thin API), logger.py and evaluate.py. `training`, `probes` and `dashboards` import from
here; nothing here imports them (the `aquainterp` command dispatches to them lazily, by module name).

The names most users want are importable from here: `from aquainterp import load_model, GPT`. They are
resolved on first use, so `import aquainterp` (and `aquainterp --help`) does not import torch.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "aquainterp.checkpoints.load",
    "GPT": "aquainterp.model.gpt",
    "GPTConfig": "aquainterp.model.gpt",
    "Engine": "aquainterp.model.engine",
    "Tokenizer": "aquainterp.tokenizer",
    "Patcher": "aquainterp.patching.patcher",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aquainterp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
