"""`aquainterp info`: what this installation runs on (versions, devices, Rust core).

The first thing to paste into a bug report, and a quick check that the install is whole.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def collect() -> dict[str, str]:
    import torch

    from aquainterp import __version__, _rustbpe

    info = {
        "aquainterp": __version__,
        "rust_core": _rustbpe.core_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for dist in ("torch", "transformer-lens", "transformers", "tokenizers", "wandb", "wandb-workspaces"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "not installed"
    info["cuda_devices"] = str(torch.cuda.device_count()) if torch.cuda.is_available() else "0 (CPU only)"
    info["cpu_threads"] = str(torch.get_num_threads())
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
