"""Write the optimizer references of tests/test_muon_nanochat.py with nanochat's own code.

    TORCHDYNAMO_DISABLE=1 python tests/golden/optim/make_reference.py --nanochat-src /tmp/nanochat-2c4473d \
        --commit 2c4473dd1b608a403700b098f867b202c2a03522 --out tests/golden/optim/nanochat-2c4473d

--nanochat-src is a checkout (or `git archive`) of nanochat at --commit, kept outside this repository: its
code is imported from there and never copied here. The script builds nanochat's GPT at a tiny size on CPU,
moves every weight off nanochat's init (several parameters start at exactly zero, which would make
cautious weight decay and the NorMuon state trivially agree), then runs nanochat's own optimizer setup
(`setup_optimizers` at 2c4473d, `setup_optimizer` at HEAD) and two of its steps on seeded gradients. It
writes <out>.safetensors (params0/grad1/grad2 in, params1/params2 out, keyed by nanochat's parameter
names) and <out>.json (provenance).

TORCHDYNAMO_DISABLE=1 runs nanochat's @torch.compile'd helpers eagerly: the same operations without
inductor's fusion, so the reference is the written maths, rounded op by op.

At 2c4473d nanochat's Polar Express casts to bf16 on every device; with --fp32-ns the script also runs the
same code with that one cast replaced by float() (the function's own source, re-executed with the
substitution), giving the 2c4473d maths in fp32, which is what this project runs on CPU. Those results are
stored as params1_fp32ns/params2_fp32ns.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

LRS = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.2)


def build(gpt, is_head: bool, seed: int):
    kwargs = dict(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    kwargs.update(n_kv_head=1, window_pattern="SL") if is_head else kwargs.update(n_kv_head=2)
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(**kwargs))
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
    grads = [{name: torch.randn(p.shape, generator=gen) * 0.01 for name, p in model.named_parameters()}
             for _ in range(2)]
    return model, kwargs, grads


def optimizers_of(model, is_head: bool) -> list:
    if is_head:
        return [model.setup_optimizer(**LRS)]
    return model.setup_optimizers(**LRS)


def two_steps(model, optimizers, grads) -> list[dict]:
    out = []
    for g in grads:
        for name, p in model.named_parameters():
            p.grad = g[name].clone()
        for opt in optimizers:
            opt.step()
        out.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return out


def fp32_polar_express(muon_module):
    """nanochat 2c4473d's zeropower_via_polar_express with its bf16 cast replaced by float()."""
    source = textwrap.dedent(inspect.getsource(muon_module.zeropower_via_polar_express.__wrapped__
                                               if hasattr(muon_module.zeropower_via_polar_express, "__wrapped__")
                                               else muon_module.zeropower_via_polar_express))
    source = "\n".join(line for line in source.splitlines() if not line.startswith("@"))
    if source.count("G.bfloat16()") != 1:
        raise SystemExit("make_reference: expected exactly one G.bfloat16() in zeropower_via_polar_express")
    namespace = dict(vars(muon_module))
    exec(compile(source.replace("G.bfloat16()", "G.float()"), "nanochat/muon.py (fp32)", "exec"), namespace)
    return namespace["zeropower_via_polar_express"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat-src", required=True, type=Path)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--fp32-ns", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TORCHDYNAMO_DISABLE") != "1":
        raise SystemExit("make_reference: run with TORCHDYNAMO_DISABLE=1 (nanochat's compiled helpers run eagerly)")
    sys.path.insert(0, str(args.nanochat_src.resolve()))
    import nanochat.gpt as gpt

    is_head = hasattr(gpt.GPT, "setup_optimizer")
    model, kwargs, grads = build(gpt, is_head, args.seed)
    params0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = two_steps(model, optimizers_of(model, is_head), grads)
    tensors = {f"params0.{k}": v for k, v in params0.items()}
    for i, g in enumerate(grads, 1):
        tensors.update({f"grad{i}.{k}": v for k, v in g.items()})
    for i, r in enumerate(results, 1):
        tensors.update({f"params{i}.{k}": v for k, v in r.items()})
    if args.fp32_ns:
        import nanochat.muon as muon

        muon.zeropower_via_polar_express = fp32_polar_express(muon)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params0[name])
        for i, r in enumerate(two_steps(model, optimizers_of(model, is_head), grads), 1):
            tensors.update({f"params{i}_fp32ns.{k}": v for k, v in r.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(args.out.with_suffix(".safetensors")))
    provenance = {
        "nanochat_commit": args.commit,
        "nanochat_function": "GPT.setup_optimizer (MuonAdamW)" if is_head else "GPT.setup_optimizers ([AdamW, Muon])",
        "optimizer_arguments": LRS,
        "model_config": kwargs,
        "seed": args.seed,
        "weights": "nanochat init_weights(), then every matrix ~ N(0, 1/fan_in), every other parameter "
                   "~ U(0.5, 1.0); gradients ~ N(0, 0.01^2), one set per step",
        "steps": 2,
        "fp32_ns": "params*_fp32ns: the same two steps with zeropower_via_polar_express's G.bfloat16() "
                   "replaced by G.float()" if args.fp32_ns else None,
        "torch": torch.__version__,
        "device": "cpu",
        "eager": "TORCHDYNAMO_DISABLE=1",
        "machine": platform.processor() or platform.machine(),
        "script": "tests/golden/optim/make_reference.py",
    }
    args.out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {args.out.with_suffix('.safetensors')} ({len(tensors)} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
