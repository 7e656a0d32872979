"""Multiple-choice evaluation: categorical (letter logits) and generative (sample, extract) accuracy.

- categorical: render the "direct" prompt up to "Answer:", take the next-token logits restricted to the
  five letter tokens (tasks.decision_prompt), argmax. One forward per problem, batched.
- generative: render the "reasoning" prompt, sample `num_samples` completions with the Engine until
  <|assistant_end|>, read the letter with extract_letter (None = no answer, counted wrong). Accuracy is
  over all samples; pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem.
Both report a gold x predicted confusion table (predicted None is its own column).

DDP: when torch.distributed is initialised, rank r evaluates problems[r::world] and the counts are
all-reduced, so every rank returns the same totals as one process would.

nanochat's chat tasks (its scripts/chat_eval.py) are scored here too, with nanochat's prompts and rules:
GSM8K generatively (gsm8k_eval: the number after "#### " in the completion, tasks.gsm8k.extract_answer),
ARC and MMLU categorically (choice_eval: the logits at <|assistant_start|> restricted to the problem's own
label tokens, tasks.choice). Their results are TaskResults (accuracy, pass@k, one record per sample).

Also the `aquainterp eval` command (add_arguments / run at the bottom).
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from contextlib import contextmanager
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


def pass_ks(num_samples: int) -> list[int]:
    """The k of pass@k reported for n samples a problem: powers of two up to 64 that are <= n, and n."""
    powers = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= num_samples]
    return powers + ([num_samples] if num_samples not in powers else [])


def eval_metrics(result, task: str) -> dict[str, float]:
    """Logger metrics of an EvalResult or TaskResult under the design's names (docs/design.md):
    eval/<task>_acc, _answered and _pass@k (generative), eval/<task>_categorical_acc (categorical)."""
    if result.mode == "categorical":
        return {f"eval/{task}_categorical_acc": result.accuracy}
    out = {f"eval/{task}_acc": result.accuracy, f"eval/{task}_answered": result.answered / max(result.samples, 1)}
    out.update({f"eval/{task}_pass@{k}": v for k, v in result.pass_at.items()})
    return out


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
        return eval_metrics(self, task)

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
    pass_sums = dict.fromkeys(pass_ks(num_samples), 0.0)
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
            for k in pass_sums:
                pass_sums[k] += pass_at_k(num_samples, hits, k)
            result.problems += 1
        bar.update(len(chunk))
    bar.close()
    _all_reduce(result, pass_sums, _device(model))
    _warn_too_long(too_long, limit, len(indexed))
    return result


@contextmanager
def eval_mode(model):
    """model.eval() for the block, then the training flag the caller had (RL evaluates mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(model, tokenizer, problems: list[MCProblem], mode: str = "categorical", **kwargs) -> EvalResult:
    """categorical_eval or generative_eval by name."""
    if mode not in MODES:
        raise ValueError(f"evaluate: mode must be one of {MODES}, got {mode!r}")
    if not problems:
        raise ValueError("evaluate: no problems to evaluate")
    with eval_mode(model):
        run = categorical_eval if mode == "categorical" else generative_eval
        return run(model, tokenizer, problems, **kwargs)


# ------------------------------------------------------------------ nanochat's tasks: GSM8K, ARC, MMLU

NANOCHAT_TASKS = ("gsm8k", "arc", "mmlu")


@dataclass
class TaskResult:
    """Accuracy on one of nanochat's chat tasks, scored as nanochat's scripts/chat_eval.py scores it.

    categorical (ARC, MMLU): one prediction per problem, the argmax over the problem's label tokens.
    generative (GSM8K): num_samples completions per problem; a sample is correct when its extracted
    number equals the gold one (string equality after nanochat's normalisation); nanochat's own GSM8K
    number is pass@num_samples (a problem passes when any sample does). `records` hold one dict per
    sample (source, gold, predicted and, generative, the completion text)."""

    task: str
    mode: str
    problems: int = 0
    samples: int = 0
    correct: int = 0
    answered: int = 0
    pass_at: dict[int, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.samples += 1
        self.correct += record["predicted"] is not None and record["predicted"] == record["gold"]
        self.answered += record["predicted"] is not None

    def metrics(self) -> dict[str, float]:
        return eval_metrics(self, self.task)

    def to_dict(self) -> dict:
        return {"task": self.task, "mode": self.mode, "problems": self.problems, "samples": self.samples,
                "correct": self.correct, "answered": self.answered, "accuracy": self.accuracy,
                "pass_at_k": self.pass_at, "records": self.records}

    def report(self) -> str:
        what = "answered" if self.mode == "generative" else "scored"
        lines = [f"{self.task} {self.mode} accuracy {self.accuracy:.4f} ({self.correct}/{self.samples} samples, "
                 f"{self.problems} problems, {self.answered} {what})"]
        lines += [f"pass@{k} {v:.4f}" for k, v in self.pass_at.items()]
        if self.mode == "categorical":
            counts = Counter(r["predicted"] for r in self.records)
            lines.append("predicted " + " ".join(f"{k}:{n}" for k, n in sorted(counts.items())))
        return "\n".join(lines)


def _gather_task_result(result: TaskResult, pass_sums: dict[int, float], per_problem: int = 1) -> None:
    """Under torch.distributed: every rank ends with everyone's counts and records, the records back in the
    problems' order (rank r evaluated problems r, r + world, ...; `per_problem` records each)."""
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (result.problems, result.records, pass_sums))
        result.problems = sum(g[0] for g in gathered)
        records = [record for k in range(max(g[0] for g in gathered)) for g in gathered if k < g[0]
                   for record in g[1][k * per_problem : (k + 1) * per_problem]]
        pass_sums = {k: sum(g[2][k] for g in gathered) for k in pass_sums}
        result.records, result.samples, result.correct, result.answered = [], 0, 0, 0
        for r in records:
            result.add(r)
    result.pass_at = {k: s / result.problems if result.problems else 0.0 for k, s in pass_sums.items()}


@torch.no_grad()
def choice_eval(model, tokenizer, problems: list, task: str = "arc", batch_size: int = 8,
                progress: bool = True) -> TaskResult:
    """nanochat's categorical eval: render the question with its lettered choices (tasks.choice), read the
    logits at <|assistant_start|> restricted to the problem's own label tokens, predict the argmax."""
    from aquainterp.tasks.choice import decision_prompt

    device = _device(model)
    mine, rank = _shard(problems)
    result = TaskResult(task, "categorical")
    limit, too_long = _sequence_len(model), []
    for start in tqdm(range(0, len(mine), batch_size), desc=f"{task} eval", unit="batch",
                      disable=not progress or rank != 0):
        batch = mine[start : start + batch_size]
        prompts = [decision_prompt(tokenizer, p) for p in batch]
        too_long += [(problem, len(ids)) for problem, (ids, _) in zip(batch, prompts) if len(ids) > limit]
        width = max(len(ids) for ids, _ in prompts)
        x = torch.zeros((len(batch), width), dtype=torch.long, device=device)  # right padding: never seen
        for i, (ids, _) in enumerate(prompts):
            x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = model(x, logits_at=torch.tensor([len(ids) - 1 for ids, _ in prompts], device=device))
        for i, (problem, (_, label_ids)) in enumerate(zip(batch, prompts)):
            predicted = problem.letters[int(logits[i, label_ids].argmax())]
            result.add({"source": problem.source, "gold": problem.answer, "predicted": predicted})
        result.problems += len(batch)
    _gather_task_result(result, {})
    _warn_too_long(too_long, limit, len(mine))
    return result


@torch.no_grad()
def gsm8k_eval(model, tokenizer, problems: list, num_samples: int = 1, max_new_tokens: int = 512,
               temperature: float | None = None, top_k: int | None = 50, seed: int = 0, progress: bool = True,
               batch_size: int = 16, tools: bool = True) -> TaskResult:
    """nanochat's GSM8K eval: the question alone as the user message, completions sampled until
    <|assistant_end|> or <|bos|> (nanochat's terminal tokens, not part of the text), the number read with
    nanochat's rule (tasks.gsm8k.extract_answer) and compared as a string with the gold one. Defaults are
    nanochat chat_eval's (temperature 0 for one sample, top-k 50, 512 new tokens).

    tools (default, as nanochat's Engine): nanochat's calculator runs (aquainterp.model.streaming), so a model that
    writes <|python_start|>48/2<|python_end|> gets <|output_start|>24.0<|output_end|> forced into its
    completion; each sample is then decoded alone (problem i's samples from one generator seeded seed + i).
    tools=False: no tool, problems decoded batch_size at a time (Engine.generate_batch), faster."""
    from aquainterp.model.engine import Engine
    from aquainterp.model.streaming import stream_tokens
    from aquainterp.tasks.gsm8k import extract_answer

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"gsm8k_eval: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    engine = Engine(model)
    stop = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id)

    def with_tools(prompt: list[int], problem_seed: int) -> list[list[int]]:
        generator = torch.Generator(device=_device(model))
        generator.manual_seed(problem_seed)
        return [list(stream_tokens(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, stop_tokens=stop, generator=generator, tokenizer=tokenizer))
                for _ in range(num_samples)]

    indexed, rank = _shard(list(enumerate(problems)))
    result = TaskResult("gsm8k", "generative")
    limit, too_long = _sequence_len(model), []
    pass_sums = dict.fromkeys(pass_ks(num_samples), 0.0)
    bar = tqdm(total=len(indexed), desc="gsm8k eval", unit="problem", disable=not progress or rank != 0)
    for start in range(0, len(indexed), batch_size):
        chunk = indexed[start : start + batch_size]
        prompts = [list(tokenizer.render_for_completion({"messages": [{"role": "user", "content": p.question}]}))
                   for _, p in chunk]
        too_long += [(problem, len(ids)) for (_, problem), ids in zip(chunk, prompts) if len(ids) > limit]
        if tools:
            samples = [with_tools(prompt, seed + index) for (index, _), prompt in zip(chunk, prompts)]
        else:
            samples = [gen.completions for gen in engine.generate_batch(
                prompts, num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, stop_tokens=stop, seeds=[seed + index for index, _ in chunk])]
        for (_, problem), completions in zip(chunk, samples):
            hits = 0
            for completion in completions:
                tokens = completion[:-1] if completion and completion[-1] in stop else completion
                text = tokenizer.decode(tokens)
                predicted = extract_answer(text)
                result.add({"source": problem.source, "gold": problem.answer, "predicted": predicted,
                            "completion": text})
                hits += predicted == problem.answer
            for k in pass_sums:
                pass_sums[k] += pass_at_k(num_samples, hits, k)
            result.problems += 1
        bar.update(len(chunk))
    bar.close()
    _gather_task_result(result, pass_sums, num_samples)
    _warn_too_long(too_long, limit, len(indexed))
    return result


def evaluate_task(model, tokenizer, problems: list, task: str, **kwargs) -> TaskResult:
    """gsm8k_eval (task gsm8k) or choice_eval (arc, mmlu), in eval mode."""
    if task not in NANOCHAT_TASKS:
        raise ValueError(f"evaluate_task: task must be one of {NANOCHAT_TASKS}, got {task!r}")
    if not problems:
        raise ValueError("evaluate_task: no problems to evaluate")
    with eval_mode(model):
        if task == "gsm8k":
            return gsm8k_eval(model, tokenizer, problems, **kwargs)
        return choice_eval(model, tokenizer, problems, task=task, **kwargs)


TASKS = ("synthetic", "aqua", *NANOCHAT_TASKS)
HUB_CONFIGS = {"arc": ("ARC-Easy", "ARC-Challenge"), "mmlu": ("all",)}  # --subset: the hub config


def _check_task_of(task: str, data) -> None:
    """Refuse a local file whose first row belongs to another task, naming that task (a GSM8K file given to
    --task aqua: "looks like a gsm8k file ... run with --task gsm8k"), before any row is parsed."""
    from aquainterp.tasks.detect import wrong_task_message
    from aquainterp.tasks.rows import RowError, is_local, source_rows

    if not is_local(data):
        return
    for _where, row in source_rows(data, None, "", "load_problems: file not found"):
        if isinstance(row, RowError):
            return  # the loader names the bad row
        message = wrong_task_message(task, data, row)
        if message:
            raise ValueError(message)
        return


def load_problems(task: str, data: str | None = None, n: int | None = None, seed: int = 0,
                  split: str | None = None, difficulty: int | None = None,
                  skip_bad_rows: bool = False, subset: str | None = None) -> list:
    """The first `n` problems of the synthetic eval split, or of a task's local file (JSON Lines; gsm8k, arc,
    mmlu also parquet) or hub split: MCProblems (synthetic, aqua), GSM8KProblems (gsm8k) or ChoiceProblems
    (arc, mmlu). `subset` is the hub config of arc (ARC-Easy, ARC-Challenge) and mmlu (all). A local file
    whose first row is another task's is refused with the task it looks like. nanochat shuffles a hub split
    (seed 42) before taking its first problems; this takes them in the file's order."""
    if n is not None and n < 1:
        raise ValueError(f"load_problems: n must be >= 1, got {n}")
    if task not in TASKS:
        raise ValueError(f"load_problems: task must be one of {', '.join(TASKS)}, got {task!r}")
    if subset is not None and subset not in HUB_CONFIGS.get(task, ()):
        raise ValueError(f"load_problems: subset is the hub config of arc {HUB_CONFIGS['arc']} or mmlu "
                         f"{HUB_CONFIGS['mmlu']}; got {subset!r} for task {task}")
    if data is not None and task != "synthetic":
        _check_task_of(task, data)
    if task in NANOCHAT_TASKS:
        if task == "gsm8k":
            from aquainterp.tasks.gsm8k import HUB_ID, load_gsm8k

            problems = load_gsm8k(data or HUB_ID, split=split or "test", skip_bad_rows=skip_bad_rows)
        elif task == "arc":
            from aquainterp.tasks.arc import HUB_ID, load_arc

            problems = load_arc(data or HUB_ID, config=subset or "ARC-Easy", split=split or "test",
                                skip_bad_rows=skip_bad_rows)
        else:
            from aquainterp.tasks.mmlu import HUB_ID, load_mmlu

            problems = load_mmlu(data or HUB_ID, config=subset or "all", split=split or "test",
                                 skip_bad_rows=skip_bad_rows)
        return problems[:n] if n else problems
    if task == "synthetic":
        from aquainterp.tasks.synthetic import SyntheticTask

        if data is not None:
            raise ValueError("load_problems: --data is for task 'aqua'; the synthetic task is generated")
        return SyntheticTask(seed=seed, split=split or "eval", difficulty=difficulty).problems(n or 500)
    if task == "aqua":
        from aquainterp.tasks.aqua import HUB_ID, load_aqua

        problems = load_aqua(data or HUB_ID, split=split or "validation", skip_bad_rows=skip_bad_rows)
        return problems[:n] if n else problems
    raise AssertionError(task)  # every task returned above


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
    source.add_argument("-i", "--source", choices=("base", "mid", "sft", "rl"), default=None,
                        help="as nanochat's chat_eval -i: the <stage>_checkpoints/ folder of nanochat's base folder "
                             "($NANOCHAT_BASE_DIR, else ~/.cache/nanochat); the largest model tag unless -g")
    parser.add_argument("-g", "--model-tag", default=None, help="with -i: the nanochat model tag to open")
    parser.add_argument("--tokenizer", type=existing_path("dir"), default=None,
                        help="tokenizer folder (tokenizer.json) for --hf-dir; default: the HF directory itself")
    parser.add_argument("-s", "--step", type=count_int(), default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--task", choices=TASKS, default="synthetic",
                        help="problems: the embedded synthetic task, AQuA-RAT, or nanochat's chat tasks scored as "
                             "nanochat scores them: gsm8k (generative, the number after '####'), arc and mmlu "
                             "(categorical over the answer labels) (default synthetic)")
    parser.add_argument("--data", type=data_source, default=None,
                        help="local file (JSON Lines; gsm8k/arc/mmlu also parquet) or hub id owner/name; default: "
                             "the task's hub dataset (deepmind/aqua_rat, openai/gsm8k, allenai/ai2_arc, cais/mmlu)")
    parser.add_argument("--split", default=None,
                        help="synthetic: eval|train (eval); hub split: aqua validation, gsm8k/arc/mmlu test")
    parser.add_argument("--subset", default=None,
                        help="hub config: arc ARC-Easy (default) or ARC-Challenge; mmlu all (default)")
    parser.add_argument("--num-problems", "--n", dest="n", type=positive_int(), default=None,
                        help="evaluate the first N problems (synthetic: 500); under torchrun spell it "
                             "--num-problems, since torchrun's own parser rejects --n as ambiguous")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="synthetic/aqua: categorical (argmax of the five letter logits after 'Answer:' in a "
                             "prompt without rationale, the default) or generative (the letter its completions "
                             "state); gsm8k is generative and arc/mmlu categorical only, as in nanochat")
    parser.add_argument("--num-samples", type=positive_int(100_000), default=1, help="generative: samples per problem")
    parser.add_argument("--max-new-tokens", type=positive_int(1 << 20), default=None,
                        help="generative: longest completion in tokens (default 256; gsm8k 512, nanochat's)")
    parser.add_argument("--temperature", type=number(float, 0.0, 100.0), default=None,
                        help="default 0 for 1 sample, else 1.0")
    parser.add_argument("--top-k", type=positive_int(), default=None,
                        help="generative: sample from the k most likely tokens (default: the full vocabulary; "
                             "gsm8k 50, nanochat's)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of the synthetic problems and of sampling (default 0)")
    parser.add_argument("--difficulty", type=int, default=None, choices=(1, 2, 3),
                        help="synthetic difficulty (default: the task's mix of levels)")
    parser.add_argument("--batch-size", type=positive_int(1 << 20), default=16,
                        help="problems per batch: categorical, prompts per forward; generative, problems "
                             "decoded together (each with --num-samples rows)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed data rows")
    parser.add_argument("--no-tools", dest="tools", action="store_false",
                        help="gsm8k: do not run nanochat's calculator tool (by default, as nanochat's Engine, "
                             "<|python_start|>expr<|python_end|> gets <|output_start|>value<|output_end|> forced in, "
                             "one sample at a time); without it problems decode --batch-size at a time")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--json", type=output_path("file"), default=None,
                        help="also write the result as JSON to this path (a new file, or one eval wrote)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --json replace a file eval did not write (never one of its inputs)")


def run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) the ranks share the problems; rank 0 prints and writes JSON."""
    import os

    from aquainterp.cli.rundir import claim_output

    _check_mode(args)
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
    if args.data is not None and args.task != "synthetic":  # another task's file fails now, not after the model
        _check_task_of(args.task, args.data)
    if getattr(args, "hf_dir", None) is not None:
        from aquainterp.checkpoints.huggingface import import_hf
        from aquainterp.tokenizer import Tokenizer

        model = import_hf(args.hf_dir).to(device)
        tok_dir = args.tokenizer or args.hf_dir
        if not (tok_dir / "tokenizer.json").is_file():
            raise SystemExit(f"aquainterp eval: no tokenizer.json in {tok_dir}; pass --tokenizer DIR")
        tokenizer = Tokenizer.load(tok_dir)
    else:
        from aquainterp.checkpoints.load import checkpoint_argument

        checkpoint = checkpoint_argument(args.checkpoint, getattr(args, "source", None),
                                         getattr(args, "model_tag", None))
        model, tokenizer, _meta = load_model(checkpoint, args.step, device=device)
    if tokenizer is None:
        raise SystemExit(f"aquainterp eval: checkpoint {args.checkpoint} has no tokenizer folder")
    problems = load_problems(args.task, args.data, args.n, args.seed, args.split, args.difficulty,
                             args.skip_bad_rows, getattr(args, "subset", None))
    if args.task in NANOCHAT_TASKS:
        return _report_task(args, rank, model, tokenizer, problems)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256
    if args.mode is None:
        args.mode = "categorical"
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


TASK_MODES = {"gsm8k": "generative", "arc": "categorical", "mmlu": "categorical"}


def _check_mode(args) -> None:
    from aquainterp.cli.rundir import UsageError

    mode = TASK_MODES.get(args.task)
    if mode is not None and args.mode not in (None, mode):
        raise UsageError(f"--task {args.task} is scored {mode}ly (as nanochat does); --mode {args.mode} is "
                         "for synthetic and aqua")


def _report_task(args, rank: int, model, tokenizer, problems: list) -> int:
    """`aquainterp eval --task gsm8k|arc|mmlu`: nanochat's scoring, the report, --json with every record."""

    if TASK_MODES[args.task] == "categorical":
        kwargs = {"batch_size": args.batch_size}
    else:
        kwargs = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens or 512,
                  "temperature": args.temperature, "top_k": args.top_k or 50, "seed": args.seed,
                  "batch_size": args.batch_size, "tools": getattr(args, "tools", True)}
    result = evaluate_task(model, tokenizer, problems, args.task, **kwargs)
    if rank != 0:
        return 0
    print(f"{args.task} ({len(problems)} problems)")
    print(result.report())
    if args.json:
        from aquainterp.cli.rundir import write_output

        record = {**result.to_dict(), "metrics": result.metrics()}
        write_output(args.json, json.dumps(strict_json(record), indent=2, allow_nan=False) + "\n", OWNER)
    return 0


def strict_json(value):
    """`value` with every NaN or infinity replaced by None, so the JSON is strict (no bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value
