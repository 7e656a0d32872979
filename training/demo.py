"""`aquainterp demo`: from nothing to a trained, probed, patched model with dashboards, on a laptop CPU.

The whole pipeline at toy scale, every stage through the same code a real run uses:

  1. tokenizer  rustbpe trained on the synthetic AQuA-style task (training.tok_train)
  2. base       tiny GPT pretrained on synthetic problem text (training.base)
  3. sft        chat fine-tune on "direct" + "checked" conversations (training.sft), then held-out
                categorical and generative accuracy (aquainterp.evaluate)
  4. rl         GRPO with every probe on, logged to an offline W&B run and metrics.jsonl (training.rl)
  5. dashboards the shipped templates rendered to one offline HTML page + W&B workspace JSON
                (the `aquainterp dashboard` command)
  6. patching   an activation-patching sweep on the final checkpoint (the `aquainterp patch` command)

Stages are cached: each writes `stage.json` with a hash of its settings and of the stages before it,
and a second run reuses every stage whose hash still matches (`--fresh` redoes them all). `--budget small`
runs the same code path with smaller step counts (tests).

Same numbers on every Intel machine: the demo runs `--threads` torch threads (default 1), asks MKL for its
strict reproducible mode (`MKL_CBWR=AVX2,STRICT`) and torch for its AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`),
both before the first tensor operation, so a seed gives bit-identical results with 1 or 2 threads (tested)
and on Intel CPUs with AVX2 or AVX-512 alike. Without them, the thread count changes how MKL's GEMMs sum
(base losses differ from step 3 on) and AVX-512 kernels round differently from AVX2 ones; the tiny model's
training is chaotic enough that such rounding ends in different accuracies. The demo runs no bf16 math and
no oneDNN primitive on CPU. Not covered: AMD CPUs (MKL's AVX2 branch is Intel-only; elsewhere MKL runs its
AUTO branch, and an AMD EPYC's numbers differed from docs/demo.md's: ../shared/fixtures/demo-numerics;
`MKL_CBWR=COMPATIBLE,STRICT` is MKL's one branch documented as the same on Intel and AMD, at about twice
the GEMM time), other torch or MKL versions, builds without MKL (ARM, Apple), GPUs. summary.json's
`numerics` records the CPU and library fingerprint of a run (numerics_fingerprint).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from aquainterp.cli.rundir import (
    RunDirError,
    check_can_create,
    foreign,
    output_path,
    protected,
    remove_owned,
    write_marker,
)
from training.demo_summary import floats, headline, print_summary, say

# Settings per budget, chosen by measurement (docs/demo.md, "What the demo shows, seed by seed"). "full" is the
# documented demo: 250 SFT steps leave the policy at 0.37-0.65 held-out greedy accuracy for seeds 0-2 (the
# arithmetic is right, the option checks are not yet), and 120 GRPO steps of 32 problems × 8 samples at 0.3
# of the base learning rates, with a KL penalty of 0.2 to the SFT policy, add 26.0-32.0 points. Without the KL
# term seed 0's weaker policy (0.365) drifted into answering without the checks and collapsed onto one letter
# (0.205 after 80 steps); with it, 80 steps of a 160-step schedule reached 0.56. "small" (the slow test)
# trains the same tokenizer, base and SFT policy and runs a shorter GRPO stage on fewer held-out problems;
# "smoke" runs every stage and learns nothing (plumbing checks, e.g. the run-folder safety tests): its model is
# too small to write "Answer:", so the patching stage is skipped (patch_pairs 0) and says so.
# The demo keeps nanochat-2025-10. Measured at this budget (seed 0, same code, 2 CPU cores): base loss 0.498
# (2025-10) vs 0.492 (2026-07), but SFT held-out generative accuracy 0.68 vs 0.54 on 50 problems: the 2026-07
# GPT is not better here, and 2025-10 is what HF NanoChat / TL's bridge can open.
FULL = dict(difficulty=1, vocab_size=512, tok_chars=1_000_000, depth=2, architecture="nanochat-2025-10",
            aspect_ratio=64, head_dim=32,
            seq_len=128, base_steps=300, base_batch_tokens=2048, base_device_batch=16,
            sft_examples=8000, sft_steps=250, sft_batch=32, sft_device_batch=32, sft_lr_frac=0.5,
            sft_styles="direct,checked",
            eval_n=200, gen_eval_n=200,
            rl_steps=120, rl_examples=32, rl_samples=8, rl_new_tokens=48, rl_lr_frac=0.3, rl_kl_coef=0.2,
            rl_eval=200, rl_probe_batch=32,
            patch_pairs=8)
BUDGETS = {
    "full": FULL,
    "small": {**FULL, "eval_n": 100, "gen_eval_n": 100, "rl_steps": 60, "rl_examples": 16, "rl_eval": 100,
              "rl_probe_batch": 16, "patch_pairs": 4},
    "smoke": {**FULL, "tok_chars": 300_000, "head_dim": 64, "base_steps": 20, "sft_examples": 400, "sft_steps": 10,
              "sft_batch": 16, "sft_device_batch": 16, "eval_n": 40, "gen_eval_n": 8, "rl_steps": 2,
              "rl_examples": 4, "rl_samples": 4, "rl_new_tokens": 24, "rl_lr_frac": 0.05, "rl_eval": 20,
              "rl_probe_batch": 8, "patch_pairs": 0},
}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    budget: str = "full"
    seed: int = 0
    fresh: bool = False
    device: str = "cpu"
    wandb: str = "offline"
    threads: int = 1  # torch threads; numbers do not depend on it (MKL_CBWR strict mode)


# What decides the demo's floating-point results on an x86 CPU besides the seed, pinned: MKL's conditional
# numerical reproducibility (STRICT: GEMM sums independent of the thread count; AVX2: the same code path on
# Intel AVX2 and AVX-512 CPUs; MKL runs its AUTO branch on AMD instead) and torch's own kernels (softmax,
# norms, attention) at their AVX2 level. A user's MKL_CBWR is kept (COMPATIBLE,STRICT: the same on AMD).
NUMERICS_ENV = {"MKL_CBWR": "AVX2,STRICT", "ATEN_CPU_CAPABILITY": "avx2"}
MKL_CBWR = NUMERICS_ENV["MKL_CBWR"]


def pin_numerics(threads: int) -> dict:
    """Pin NUMERICS_ENV and the torch thread count. MKL and torch read those variables at their first
    tensor operation, so this runs before any (scripts/demo also exports them); a value the user set is
    kept. Returns what is in force (it goes into the stage keys and summary.json). The demo never compiles
    on CPU: with ATEN_CPU_CAPABILITY=avx2 in force, torch.compile's CPU kernels gave NaN logits here."""
    for name, value in NUMERICS_ENV.items():
        os.environ.setdefault(name, value)
    import torch

    torch.set_num_threads(threads)
    return {"threads": threads, "mkl_cbwr": os.environ["MKL_CBWR"], "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **numerics_fingerprint()}


# The CPU features the numeric libraries dispatch on: MKL and torch's kernels by AVX2/AVX-512, oneDNN's bf16
# matmuls by avx512_bf16/AMX (native) or their absence (bf16 emulated or sent to ATen's scalar loops).
FINGERPRINT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_fingerprint(cpuinfo: str) -> dict:
    """Vendor, model and the FINGERPRINT_FLAGS present, from the first processor of /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_vendor": fields.get("vendor_id", "unknown"), "cpu_model": fields.get("model name", "unknown"),
            "cpu_flags": [f for f in FINGERPRINT_FLAGS if f in flags]}


def source_commit() -> dict:
    """{"commit": the repository's HEAD, "dirty": uncommitted changes to tracked files} of the code that ran;
    both None outside a git checkout (an installed wheel)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def numerics_fingerprint() -> dict:
    """What besides the pinned settings decides the demo's floating-point results, for summary.json: the
    CPU (cpu_fingerprint), the MKL and oneDNN builds inside torch, oneDNN's ISA cap if one is set, and
    whether torch sends bf16 matmuls to oneDNN on this CPU (True: oneDNN's bf16 kernels, which differ by
    CPU; False: ATen's own loops). The demo itself runs no oneDNN primitive (fp32 throughout)."""
    import platform
    import re

    import torch

    try:
        cpu = cpu_fingerprint(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        cpu = {"cpu_vendor": "unknown", "cpu_model": platform.processor() or "unknown", "cpu_flags": []}
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    return {**cpu, "mkl": mkl.group(1) if mkl else None, "onednn": onednn.group(1) if onednn else None,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "onednn_bf16_matmul": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


class Stage:
    """One cached pipeline stage: `done()` says whether stage.json matches this stage's key."""

    def __init__(self, root: Path, name: str, settings: dict, parent_key: str = ""):
        self.name = name
        self.dir = root / name
        blob = json.dumps({"name": name, "settings": settings, "parent": parent_key}, sort_keys=True)
        self.key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.marker = self.dir / "stage.json"

    def cached(self) -> dict | None:
        if not self.marker.exists():
            return None
        record = json.loads(self.marker.read_text())
        return record["result"] if record.get("key") == self.key else None

    def start(self) -> None:
        # a stage is redone from scratch, never half-reused; only a folder the demo made may go
        remove_owned(self.dir, DEMO_OWNER, legacy=_demo_legacy)
        self.dir.mkdir(parents=True)
        write_marker(self.dir, DEMO_OWNER, self.name)

    def finish(self, result: dict, seconds: float, cpu_seconds: float | None = None) -> dict:
        result = {**result, "seconds": round(seconds, 1)}
        if cpu_seconds is not None:  # CPU time of the demo process, all threads (fairer on a busy machine)
            result["cpu_seconds"] = round(cpu_seconds, 1)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "result": result}, indent=1))
        os.replace(tmp, self.marker)
        return result


DEMO_OWNER = "aquainterp demo"
STAGE_NAMES = ("tokenizer", "base", "sft", "rl", "dashboards", "patching")


def _demo_legacy(path: Path) -> bool:
    """A stage folder the demo finished before ownership markers existed: its stage.json has the
    demo's {key, result} record."""
    try:
        record = json.loads((path / "stage.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and set(record) == {"key", "result"}


def refuse_foreign_outputs(root: Path) -> None:
    """RunDirError naming every folder (or file) the demo would reuse, delete or overwrite under `root`
    that it did not create: `--out runs` must not touch `runs/base` of a `training.base` run."""
    why = protected(root)
    if why:
        raise RunDirError(f"--out {root} {why}; choose another --out")
    check_can_create(root, "--out")
    bad = foreign([root / name for name in STAGE_NAMES], DEMO_OWNER, legacy=_demo_legacy)
    summary = root / "summary.json"
    if summary.exists():
        try:
            ours = "wall_seconds" in json.loads(summary.read_text()) and root.is_dir()
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            bad.append(summary)
    if bad:
        raise RunDirError(f"--out {root}: {', '.join(str(p) for p in bad)} "
                          f"{'was' if len(bad) == 1 else 'were'} not created by aquainterp demo; refusing to "
                          "touch them (with or without --fresh). Move them away or choose another --out")


def run_stage(stage: Stage, fresh: bool, body) -> dict:
    if not fresh:
        cached = stage.cached()
        if cached is not None:
            print(f"[{stage.name}] cached ({stage.dir}); --fresh to redo")
            return cached
    stage.start()
    t0, c0 = time.time(), time.process_time()
    return stage.finish(body(), time.time() - t0, time.process_time() - c0)


def run_demo(config: DemoConfig) -> dict:
    if config.budget not in BUDGETS:
        raise ValueError(f"--budget must be one of {sorted(BUDGETS)}, got {config.budget!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the network
    os.environ.setdefault("WANDB_SILENT", "true")
    b = BUDGETS[config.budget]
    root = Path(config.out)
    refuse_foreign_outputs(root)  # before anything is written or deleted, --fresh included
    numerics = pin_numerics(config.threads)  # before any tensor math
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    common = {"seed": config.seed, "device": config.device, "threads": config.threads,
              "mkl_cbwr": numerics["mkl_cbwr"], "cpu_capability": numerics["cpu_capability"]}

    # 1. tokenizer -------------------------------------------------------------------------------
    from training import tok_train

    tok = Stage(root, "tokenizer", {**common, "vocab": b["vocab_size"], "chars": b["tok_chars"]})

    def train_tokenizer():
        say(f"1/6 tokenizer: rustbpe, vocab {b['vocab_size']}, on synthetic AQuA-style text")
        report = tok_train.run(tok_train.TokTrainConfig(data="synthetic", out_dir=str(tok.dir),
                                                        vocab_size=b["vocab_size"], max_chars=b["tok_chars"],
                                                        eval_docs=200))
        return {"bytes_per_token": report}

    tok_result = run_stage(tok, config.fresh, train_tokenizer)

    # 2. base pretraining --------------------------------------------------------------------------
    from training import base

    base_settings = {k: b[k] for k in ("difficulty", "depth", "architecture", "aspect_ratio", "head_dim", "seq_len", "base_steps",
                                       "base_batch_tokens", "base_device_batch")}
    base_stage = Stage(root, "base", {**common, **base_settings}, tok.key)

    def pretrain():
        say(f"2/6 base: depth {b['depth']} GPT pretrained {b['base_steps']} steps on synthetic text")
        metrics = base.run(base.BaseConfig(
            run_dir=str(base_stage.dir), tokenizer_dir=str(tok.dir), val_docs=128,
            data=f"synthetic:{config.seed}:{b['difficulty']}",
            depth=b["depth"], architecture=b["architecture"], aspect_ratio=b["aspect_ratio"],
            head_dim=b["head_dim"], seq_len=b["seq_len"], device_batch_size=b["base_device_batch"], total_batch_tokens=b["base_batch_tokens"],
            max_steps=b["base_steps"], eval_every=0, save_every=b["base_steps"], device=config.device,
            bf16="auto", compile="off", seed=config.seed, wandb="disabled"))
        return {"metrics": floats(metrics)}

    base_result = run_stage(base_stage, config.fresh, pretrain)

    # 3. SFT + held-out accuracy -------------------------------------------------------------------
    from training import sft

    sft_settings = {k: b[k] for k in ("sft_examples", "sft_steps", "sft_batch", "sft_device_batch", "sft_lr_frac", "sft_styles", "eval_n",
                                      "gen_eval_n")}
    sft_stage = Stage(root, "sft", {**common, **sft_settings}, base_stage.key)

    def finetune():
        say(f"3/6 sft: {b['sft_steps']} steps on {b['sft_examples']} synthetic conversations ({b['sft_styles']})")
        metrics = sft.run(sft.SFTConfig(
            init_from=str(base_stage.dir / "checkpoints"), run_dir=str(sft_stage.dir),
            synthetic=b["sft_examples"], synthetic_seed=config.seed + 1,
            synthetic_difficulty=b["difficulty"], device_batch_size=b["sft_device_batch"],
            examples_per_step=b["sft_batch"], max_steps=b["sft_steps"], init_lr_frac=b["sft_lr_frac"], styles=b["sft_styles"], eval_every=0, eval_synthetic=0,
            save_every=b["sft_steps"], device=config.device, bf16="auto", compile="off", seed=config.seed,
            wandb="disabled"))
        return {"metrics": floats(metrics), **held_out_accuracy(sft_stage.dir / "checkpoints", b, config)}

    sft_result = run_stage(sft_stage, config.fresh, finetune)
    print(f"SFT held-out accuracy: categorical {sft_result['categorical_acc']:.3f}, "
          f"generative {sft_result['generative_acc']:.3f} (chance 0.200)")

    # 4. GRPO with all probes ------------------------------------------------------------------------
    from training import rl

    rl_settings = {k: b[k] for k in ("rl_steps", "rl_examples", "rl_samples", "rl_new_tokens", "rl_lr_frac",
                                     "rl_kl_coef", "rl_eval", "rl_probe_batch")}
    rl_stage = Stage(root, "rl", {**common, **rl_settings, "wandb": config.wandb}, sft_stage.key)

    def reinforce():
        say(f"4/6 rl: GRPO {b['rl_steps']} steps × {b['rl_examples']} problems × {b['rl_samples']} samples, "
            f"all probes on, W&B {config.wandb} + metrics.jsonl")
        summary = rl.run(rl.RLConfig(
            task="synthetic", difficulty=b["difficulty"], checkpoint=str(sft_stage.dir / "checkpoints"),
            eval_examples=b["rl_eval"],
            max_steps=b["rl_steps"], examples_per_step=b["rl_examples"], num_samples=b["rl_samples"],
            max_new_tokens=b["rl_new_tokens"], temperature=1.0, top_k=None, pass_k=4, init_lr_frac=b["rl_lr_frac"],
            kl_coef=b["rl_kl_coef"], eval_every=max(1, b["rl_steps"] // 4), probes=rl.PROBE_NAMES, probe_every=max(1, b["rl_steps"] // 8),
            probe_batch=b["rl_probe_batch"], table_every=max(1, b["rl_steps"] // 4), out=str(rl_stage.dir),
            device=config.device, bf16="auto", seed=config.seed, wandb=config.wandb, run_name="aquainterp-demo"))
        return {"before": summary["before"], "after": summary["after"], "final": floats(summary["history"][-1])}

    rl_result = run_stage(rl_stage, config.fresh, reinforce)

    # 5. dashboards ----------------------------------------------------------------------------------
    from dashboards import cli as dashboard_cli
    from dashboards.cli import DashboardConfig

    dash_stage = Stage(root, "dashboards", common, rl_stage.key)

    def dashboards():
        say("5/6 dashboards: every shipped template as one offline HTML page + W&B workspace JSON")
        report, workspaces = dash_stage.dir / "report.html", dash_stage.dir / "workspaces"
        for action in (DashboardConfig("html", run=str(rl_stage.dir), template="all", output=str(report)),
                       DashboardConfig("export", template="all", entity="ENTITY", project="aquainterp-demo",
                                       output=str(workspaces))):
            if dashboard_cli.run(action):
                raise RuntimeError(f"aquainterp dashboard {action.action} failed")
        exported = sorted(str(p) for p in workspaces.glob("*.json"))
        return {"report": str(report), "workspaces": exported}

    dash_result = run_stage(dash_stage, config.fresh, dashboards)

    # 6. activation patching -----------------------------------------------------------------------
    from aquainterp.patching import command as patching_command

    # patch where the model decides: its own greedy completion (rationale, option checks), cut after its
    # "Answer:"; noise on the question and options
    patch_settings = {"pairs": b["patch_pairs"], "decision": "completion", "corruption": "noise"}
    patch_stage = Stage(root, "patching", {**common, **patch_settings}, rl_stage.key)

    def patching():
        say(f"6/6 patching: {b['patch_pairs']} noise-corrupted problems at the answer step of the final RL "
            "checkpoint's own completions")
        patch_config = patching_command.PatchConfig(
            checkpoint=rl_stage.dir / "checkpoints", task="synthetic", difficulty=b["difficulty"],
            n_pairs=b["patch_pairs"], decision="completion", corruption="noise", device=config.device,
            seed=config.seed, out=patch_stage.dir)
        code = patching_command.run(patch_config)
        kept_all = False
        if code:  # e.g. the pair screen left no pair (the policy answers every clean prompt wrong): patch them
            # all, flagged on the page as pairs the screen would leave out, rather than stop the demo here
            print("demo: patching with the pair screen failed (the line above); patching every pair, flagged "
                  "(--keep-all-pairs)", flush=True)
            kept_all = True
            code = patching_command.run(replace(patch_config, keep_all_pairs=True))
        if code:
            raise RuntimeError(f"aquainterp patch failed with exit code {code}")
        summary = json.loads((patch_stage.dir / "summary.json").read_text())
        return {"html": str(patch_stage.dir / "patching.html"), "n_pairs": summary["n_pairs"], "kept_all": kept_all,
                "clean_logit_diff_mean": summary["clean_logit_diff_mean"],
                "corrupted_logit_diff_mean": summary["corrupted_logit_diff_mean"],
                "strongest": {k: v["top_cells"][0] for k, v in summary["sweeps"].items()}}

    if b["patch_pairs"]:
        patch_result = run_stage(patch_stage, config.fresh, patching)
    else:
        say(f"6/6 patching: skipped (budget {config.budget!r} patches no pairs)")
        patch_result = {"skipped": f"budget {config.budget!r} patches no pairs"}

    results = {"tokenizer": tok_result, "base": base_result, "sft": sft_result, "rl": rl_result,
               "dashboards": dash_result, "patching": patch_result,
               "wall_seconds": round(time.time() - t_start, 1), "config": asdict(config)}
    stages = {"tokenizer": tok_result, "base": base_result, "sft": sft_result, "rl": rl_result,
              "dashboards": dash_result, "patching": patch_result}
    # each stage's time when it ran (a cached stage keeps the time of the run that made it)
    results["stage_seconds"] = {name: r.get("seconds") for name, r in stages.items()}
    results["stage_cpu_seconds"] = {name: r.get("cpu_seconds") for name, r in stages.items()}
    results["numerics"] = numerics
    results["source"] = source_commit()
    results["headline"] = headline(root / "rl" / "metrics.jsonl")
    (root / "summary.json").write_text(json.dumps(results, indent=1))
    print_summary(results, root)
    return results


def held_out_accuracy(checkpoint_dir: Path, b: dict, config: DemoConfig) -> dict:
    """Categorical and generative accuracy of a checkpoint on held-out synthetic problems."""
    from aquainterp.checkpoints.load import load_model
    from aquainterp.evaluate import evaluate
    from aquainterp.tasks.synthetic import SyntheticTask

    model, tokenizer, _ = load_model(checkpoint_dir, device=config.device)
    model.eval()
    problems = SyntheticTask(seed=config.seed, split="eval", difficulty=b["difficulty"]).problems(b["eval_n"])
    cat = evaluate(model, tokenizer, problems, mode="categorical")
    gen = evaluate(model, tokenizer, problems[: b["gen_eval_n"]], mode="generative", temperature=0.0,
                   max_new_tokens=b["rl_new_tokens"], seed=config.seed)
    return {"categorical_acc": cat.accuracy, "generative_acc": gen.accuracy}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from aquainterp.cli.args import SEED, device_name, positive_int

    parser.description = __doc__.split("\n\n")[0]
    d = DemoConfig()
    parser.add_argument("--out", type=output_path("root"), default=d.out,
                        help=f"where every stage writes (default {d.out})")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=d.budget,
                        help="full: the documented demo (≤ 10 min on 2 cores); small: the same story in fewer RL "
                             "steps (the slow test); smoke: every stage with tiny step counts, nothing learned, "
                             "no patching (plumbing checks)")
    parser.add_argument("--seed", type=SEED, default=d.seed, help="one seed for every stage (default 0)")
    parser.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing cached ones")
    parser.add_argument("--device", type=device_name, default=d.device, help="cpu (default), cuda or auto")
    parser.add_argument("--wandb", choices=("offline", "disabled", "online"), default=d.wandb,
                        help="W&B mode for the RL stage (default offline: no network)")
    parser.add_argument("--threads", type=positive_int(256), metavar="N", default=d.threads,
                        help=f"torch CPU threads (default {d.threads}); the numbers do not depend on N (MKL_CBWR="
                             f"{MKL_CBWR}; 1 and 2 measured bit-identical). Next to other busy jobs, 1 is fastest")


def run(args: argparse.Namespace) -> int:
    run_demo(DemoConfig(out=args.out, budget=args.budget, seed=args.seed, fresh=args.fresh, device=args.device,
                        wandb=args.wandb, threads=args.threads))
    return 0


if __name__ == "__main__":
    from aquainterp.cli.main import main

    sys.exit(main(["demo", *sys.argv[1:]]))  # the boundary of `aquainterp demo`: one-line errors, exit 2/1
