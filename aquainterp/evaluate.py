"""Multiple-choice evaluation: categorical (letter logits) and generative (sample, extract) accuracy.

- categorical: render the "direct" prompt up to "Answer:", take the next-token logits restricted to the
  five letter tokens (tasks.decision_prompt), argmax. One forward per problem, batched.
- generative: render the "reasoning" prompt, sample `num_samples` completions with the Engine until
  <|assistant_end|>, read the letter with extract_letter (None = no answer, counted wrong). Accuracy is
  over all samples; pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem.
Both report a gold x predicted confusion table (predicted None is its own column).

DDP: when torch.distributed is initialised, rank r evaluates problems[r::world] and the counts are
all-reduced, so every rank returns the same totals as one process would.

Also the `aquainterp eval` command (add_arguments / run at the bottom).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from aquainterp.tasks import LETTERS, MCProblem, conversation, decision_prompt, extract_letter

MODES = ("categorical", "generative")
COLUMNS = (*LETTERS, None)  # confusion columns: predicted A..E or no answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class EvalResult:
    mode: str
    problems: int = 0
    samples: int = 0  # = problems for categorical, problems * num_samples for generative
    correct: int = 0
    answered: int = 0  # samples with a letter (always all of them for categorical)
    confusion: list[list[int]] = field(default_factory=lambda: [[0] * len(COLUMNS) for _ in LETTERS])
    pass_at: dict[int, float] = field(default_factory=dict)  # k -> mean pass@k over problems

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def add(self, gold: str, predicted: str | None) -> None:
        self.samples += 1
        self.correct += predicted == gold
        self.answered += predicted is not None
        self.confusion[LETTERS.index(gold)][COLUMNS.index(predicted)] += 1

    def per_letter_accuracy(self) -> dict[str, float]:
        out = {}
        for i, letter in enumerate(LETTERS):
            total = sum(self.confusion[i])
            out[letter] = self.confusion[i][i] / total if total else float("nan")
        return out

    def metrics(self, task: str) -> dict[str, float]:
        """Logger metrics under the design's names (docs/design.md): eval/<task>_acc (generative), eval/<task>_categorical_acc."""
        if self.mode == "categorical":
            return {f"eval/{task}_categorical_acc": self.accuracy}
        out = {f"eval/{task}_acc": self.accuracy, f"eval/{task}_answered": self.answered / max(self.samples, 1)}
        out.update({f"eval/{task}_pass@{k}": v for k, v in self.pass_at.items()})
        return out

    def to_dict(self) -> dict:
        return {"mode": self.mode, "problems": self.problems, "samples": self.samples, "correct": self.correct,
                "answered": self.answered, "accuracy": self.accuracy, "pass_at_k": self.pass_at,
                "per_letter_accuracy": self.per_letter_accuracy(),
                "confusion": {"rows_gold": list(LETTERS), "columns_predicted": [c or "none" for c in COLUMNS],
                              "counts": self.confusion}}

    def report(self) -> str:
        lines = [f"{self.mode} accuracy {self.accuracy:.4f} ({self.correct}/{self.samples} samples, "
                 f"{self.problems} problems, {self.answered} answered)"]
        lines += [f"pass@{k} {v:.4f}" for k, v in self.pass_at.items()]
        lines.append("gold\\pred " + " ".join(f"{c or '-':>5}" for c in COLUMNS) + "   acc")
        for letter, row, acc in zip(LETTERS, self.confusion, self.per_letter_accuracy().values()):
            lines.append(f"{letter:>9} " + " ".join(f"{n:>5}" for n in row) + f"  {acc:.3f}")
        return "\n".join(lines)


def _shard(problems: list[MCProblem]) -> tuple[list[MCProblem], int]:
    """This rank's slice of the problems (all of them without torch.distributed) and the rank."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return problems[rank::world], rank
    return problems, 0


def _all_reduce(result: EvalResult, pass_sums: dict[int, float], device) -> None:
    """Sum the counts over ranks in place and turn pass@k sums into means."""
    if dist.is_available() and dist.is_initialized():
        ks = sorted(pass_sums)
        flat = [result.problems, result.samples, result.correct, result.answered]
        flat += [n for row in result.confusion for n in row] + [pass_sums[k] for k in ks]
        t = torch.tensor(flat, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        values = t.tolist()
        result.problems, result.samples, result.correct, result.answered = (int(round(v)) for v in values[:4])
        width = len(COLUMNS)
        counts = [int(round(v)) for v in values[4 : 4 + len(LETTERS) * width]]
        result.confusion = [counts[i * width : (i + 1) * width] for i in range(len(LETTERS))]
        pass_sums = dict(zip(ks, values[4 + len(LETTERS) * width :]))
    result.pass_at = {k: s / result.problems if result.problems else 0.0 for k, s in pass_sums.items()}


def _sequence_len(model) -> int:
    limit = getattr(getattr(model, "config", None), "sequence_len", None)
    return limit if isinstance(limit, int) else 1 << 62


def _warn_too_long(too_long: list, limit: int, total: int) -> None:
    """Prompts longer than the model's training length still run (the rotary tables reach 10x further),
    but never silently: one warning with how many, the longest and the first one's source."""
    if too_long:
        longest = max(n for _, n in too_long)
        warnings.warn(f"{len(too_long)} of {total} prompts are longer than the model's sequence_len {limit} "
                      f"(longest {longest} tokens, first {too_long[0][0].source}): their answers are read at "
                      "positions the model was never trained on", stacklevel=3)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def categorical_eval(model, tokenizer, problems: list[MCProblem], batch_size: int = 16,
                     progress: bool = True) -> EvalResult:
    """Accuracy of argmax over the five letter logits at the decision position."""
    device = _device(model)
    mine, rank = _shard(problems)
    result = EvalResult("categorical")
    limit, too_long = _sequence_len(model), []
    for start in tqdm(range(0, len(mine), batch_size), desc="categorical eval", unit="batch",
                      disable=not progress or rank != 0):
        batch = mine[start : start + batch_size]
        prompts = [decision_prompt(tokenizer, p) for p in batch]
        too_long += [(problem, len(ids)) for problem, (ids, _) in zip(batch, prompts) if len(ids) > limit]
        width = max(len(ids) for ids, _ in prompts)
        # right-padding is harmless: causal attention never lets a position see the padding after it
        x = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for i, (ids, _) in enumerate(prompts):
            x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        decision = torch.tensor([len(ids) - 1 for ids, _ in prompts], device=device)
        logits = model(x, logits_at=decision)  # [batch, vocab]: the decision positions only
        for i, (problem, (_, letter_ids)) in enumerate(zip(batch, prompts)):
            letter_logits = logits[i, letter_ids]
            result.add(problem.correct, LETTERS[int(letter_logits.argmax())])
        result.problems += len(batch)
    _all_reduce(result, {}, device)
    _warn_too_long(too_long, limit, len(mine))
    return result


@torch.no_grad()
def generative_eval(model, tokenizer, problems: list[MCProblem], num_samples: int = 1,
                    max_new_tokens: int = 256, temperature: float | None = None, top_k: int | None = None,
                    seed: int = 0, progress: bool = True, batch_size: int = 16) -> EvalResult:
    """Sample answers to the "reasoning" prompt and score the extracted letters; pass@k for k <= samples.

    temperature defaults to 0 (greedy) for one sample and 1.0 for several. Problem i is sampled with
    seed + i, so results do not depend on how problems are sharded over ranks (up to the float rounding
    of batched kernels). batch_size: problems decoded together (Engine.generate_batch).
    """
    from aquainterp.model.engine import Engine

    if num_samples < 1:
        raise ValueError(f"generative_eval: num_samples must be >= 1, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"generative_eval: batch_size must be >= 1, got {batch_size}")
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    engine = Engine(model)
    stop = tokenizer.encode_special("<|assistant_end|>")
    indexed, rank = _shard(list(enumerate(problems)))
    result = EvalResult("generative")
    limit, too_long = _sequence_len(model), []
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= num_samples] + ([num_samples] if num_samples not in
                                                                      (1, 2, 4, 8, 16, 32, 64) else [])
    pass_sums = dict.fromkeys(ks, 0.0)
    bar = tqdm(total=len(indexed), desc="generative eval", unit="problem", disable=not progress or rank != 0)
    for start in range(0, len(indexed), batch_size):
        chunk = indexed[start : start + batch_size]
        prompts = [list(tokenizer.render_for_completion(conversation(problem, "reasoning"))) for _, problem in chunk]
        too_long += [(problem, len(ids)) for (_, problem), ids in zip(chunk, prompts) if len(ids) > limit]
        gens = engine.generate_batch(prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, stop_tokens=(stop,),
                                     seeds=[seed + index for index, _ in chunk])
        for (_, problem), gen in zip(chunk, gens):
            hits = 0
            for completion in gen.completions:
                text = tokenizer.decode([t for t in completion if t != stop])
                letter = extract_letter(text)
                result.add(problem.correct, letter)
                hits += letter == problem.correct
            for k in ks:
                pass_sums[k] += pass_at_k(num_samples, hits, k)
            result.problems += 1
        bar.update(len(chunk))
    bar.close()
    _all_reduce(result, pass_sums, _device(model))
    _warn_too_long(too_long, limit, len(indexed))
    return result


def evaluate(model, tokenizer, problems: list[MCProblem], mode: str = "categorical", **kwargs) -> EvalResult:
    """categorical_eval or generative_eval by name."""
    if mode not in MODES:
        raise ValueError(f"evaluate: mode must be one of {MODES}, got {mode!r}")
    if not problems:
        raise ValueError("evaluate: no problems to evaluate")
    was_training = model.training
    model.eval()
    try:
        run = categorical_eval if mode == "categorical" else generative_eval
        return run(model, tokenizer, problems, **kwargs)
    finally:
        model.train(was_training)


def load_problems(task: str, data: str | None = None, n: int | None = None, seed: int = 0,
                  split: str | None = None, difficulty: int | None = None,
                  skip_bad_rows: bool = False) -> list[MCProblem]:
    """The first `n` problems of the synthetic eval split, an AQuA file, or an AQuA hub split."""
    if n is not None and n < 1:
        raise ValueError(f"load_problems: n must be >= 1, got {n}")
    if task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        if data is not None:
            raise ValueError("load_problems: --data is for task 'aqua'; the synthetic task is generated")
        return SyntheticTask(seed=seed, split=split or "eval", difficulty=difficulty).problems(n or 500)
    if task == "aqua":
        from aquainterp.tasks.aqua import HUB_ID, load_aqua

        problems = load_aqua(data or HUB_ID, split=split or "validation", skip_bad_rows=skip_bad_rows)
        return problems[:n] if n else problems
    raise ValueError(f"load_problems: task must be 'synthetic' or 'aqua', got {task!r}")


# ------------------------------------------------------------------------------- aquainterp eval


def add_arguments(parser) -> None:
    from aquainterp.cli.args import (
        SEED,
        count_int,
        data_source,
        device_name,
        existing_path,
        number,
        positive_int,
    )
    from aquainterp.cli.rundir import output_path

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing_path("dir"),
                        help="checkpoint folder written by save_checkpoint, or a nanochat checkpoint folder")
    source.add_argument("--hf-dir", type=existing_path("dir"),
                        help="HF NanoChatForCausalLM directory (single or sharded safetensors)")
    parser.add_argument("--tokenizer", type=existing_path("dir"), default=None,
                        help="tokenizer folder (tokenizer.json) for --hf-dir; default: the HF directory itself")
    parser.add_argument("--step", type=count_int(), default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--task", choices=("synthetic", "aqua"), default="synthetic",
                        help="problems: the embedded synthetic task or AQuA-RAT (default synthetic)")
    parser.add_argument("--data", type=data_source, default=None,
                        help="AQuA JSON Lines file, or hub id owner/name (task aqua)")
    parser.add_argument("--split", default=None, help="synthetic: eval|train (eval); aqua hub: split (validation)")
    parser.add_argument("--num-problems", "--n", dest="n", type=positive_int(), default=None,
                        help="evaluate the first N problems (synthetic: 500); under torchrun spell it "
                             "--num-problems, since torchrun's own parser rejects --n as ambiguous")
    parser.add_argument("--mode", choices=MODES, default="categorical",
                        help="categorical: argmax of the five letter logits after 'Answer:' in a prompt without "
                             "rationale; generative: the letter its completions state (default categorical)")
    parser.add_argument("--num-samples", type=positive_int(100_000), default=1, help="generative: samples per problem")
    parser.add_argument("--max-new-tokens", type=positive_int(1 << 20), default=256,
                        help="generative: longest completion in tokens (default 256)")
    parser.add_argument("--temperature", type=number(float, 0.0, 100.0), default=None,
                        help="default 0 for 1 sample, else 1.0")
    parser.add_argument("--top-k", type=positive_int(), default=None,
                        help="generative: sample from the k most likely tokens (default: the full vocabulary)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of the synthetic problems and of sampling (default 0)")
    parser.add_argument("--difficulty", type=int, default=None, choices=(1, 2, 3),
                        help="synthetic difficulty (default: the task's mix of levels)")
    parser.add_argument("--batch-size", type=positive_int(1 << 20), default=16,
                        help="problems per batch: categorical, prompts per forward; generative, problems "
                             "decoded together (each with --num-samples rows)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed AQuA rows")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--json", type=output_path("file"), default=None,
                        help="also write the result as JSON to this path (a new file, or one eval wrote)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --json replace a file eval did not write (never one of its inputs)")


def run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) the ranks share the problems; rank 0 prints and writes JSON."""
    import os

    from aquainterp.cli.rundir import claim_output

    if args.json:  # a bad --json path fails now, not after the evaluation; never over what eval reads
        inputs = [args.checkpoint, getattr(args, "hf_dir", None), getattr(args, "tokenizer", None),
                  args.data if args.data and Path(args.data).exists() else None]
        claim_output(args.json, "--json", owner=OWNER, kind="file", inputs=inputs,
                     overwrite=getattr(args, "overwrite", False))
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return _run_on(args, device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    code = _run_on(args, device)
    dist.barrier()  # rank 0 may still be writing; a gloo peer that leaves first can abort in C++
    dist.destroy_process_group()
    return code


def _run_on(args, device: str) -> int:
    from aquainterp.checkpoints.load import load_model

    rank = dist.get_rank() if dist.is_initialized() else 0
    if getattr(args, "hf_dir", None) is not None:
        from aquainterp.checkpoints.huggingface import import_hf
        from aquainterp.tokenizer import Tokenizer

        model = import_hf(args.hf_dir).to(device)
        tok_dir = args.tokenizer or args.hf_dir
        if not (tok_dir / "tokenizer.json").is_file():
            raise SystemExit(f"aquainterp eval: no tokenizer.json in {tok_dir}; pass --tokenizer DIR")
        tokenizer = Tokenizer.load(tok_dir)
    else:
        model, tokenizer, _meta = load_model(args.checkpoint, args.step, device=device)
    if tokenizer is None:
        raise SystemExit(f"aquainterp eval: checkpoint {args.checkpoint} has no tokenizer folder")
    problems = load_problems(args.task, args.data, args.n, args.seed, args.split, args.difficulty,
                             args.skip_bad_rows)
    if args.mode == "categorical":
        kwargs = {"batch_size": args.batch_size}
    else:
        kwargs = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                  "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
                  "batch_size": args.batch_size}
    result = evaluate(model, tokenizer, problems, args.mode, **kwargs)
    if rank != 0:
        return 0
    print(f"{args.task} ({len(problems)} problems)")
    print(result.report())
    if args.json:
        from aquainterp.cli.rundir import write_output

        record = {"task": args.task, **result.to_dict(), "metrics": result.metrics(args.task)}
        write_output(args.json, json.dumps(strict_json(record), indent=2, allow_nan=False) + "\n", OWNER)
    return 0


OWNER = "aquainterp eval"


def strict_json(value):
    """`value` with every NaN or infinity replaced by None, so the JSON is strict (no bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value
