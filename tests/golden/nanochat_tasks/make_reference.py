"""Write the nanochat-task references of tests/test_nanochat_tasks.py with nanochat's own code.

    PYTHONPATH=NANODEPS python tests/golden/nanochat_tasks/make_reference.py \
        --nanochat-src /tmp/nanochat-92d63d4 --fixture ../shared/fixtures/nanochat/nanochat-head-d4 \
        --gsm8k ../shared/data/gsm8k/test.jsonl --samples tests/golden/nanochat_tasks \
        --out tests/golden/nanochat_tasks/nanochat-head-d4.json

--nanochat-src is a checkout of nanochat kept outside this repository: its code is imported from there,
never copied here. nanochat imports tiktoken and rustbpe at module level, so NANODEPS must hold them
(`pip install --target NANODEPS tiktoken rustbpe`). What the JSON holds, each produced by nanochat's code:

- folder_rule: nanochat's checkpoint_manager.find_largest_model / find_last_step on a tree of nanochat-style
  folders this script builds (empty model_<step>.pt files, mtimes set), and the exception each raises on
  the trees where it finds nothing; the same tree is rebuilt by the test from `trees`.
- resolved: what load_model_from_dir(<fixture>/base_checkpoints) chose (tag, step) for the fixture.
- gsm8k_gold: nanochat's ground truth for every row of the GSM8K file (GSM8K.get_example, then
  extract_answer on the last text part, as GSM8K.evaluate does).
- gsm8k_extract: extract_answer on hand-written completion strings (edge cases of the rule).
- gsm8k_fixture: for a few short GSM8K questions, the prompt ids (tokenizer.render_for_completion), the
  greedy completion ids of Engine.generate_batch (temperature 0, terminal token not included), the
  decoded text, extract_answer of it and GSM8K.evaluate's outcome.
- arc_fixture / mmlu_fixture: run_categorical_eval (scripts/chat_eval.py) on the hand-made sample files,
  with the letter it predicted for each problem (recorded by wrapping the task's evaluate) and its accuracy.
- calculator: nanochat's engine.use_calculator on hand-written expressions, as the text its Engine forces
  (str of the value; None when it forces nothing).
- chat_fixture: the conversation tokens chat_cli builds for one user message and the tokens Engine.generate
  yields for it at temperature 0 (what `aquainterp chat -p ... --temperature 0` must print), and with
  chat_cli's defaults (temperature 0.6, top-k 50, Engine's seed 42) under "sampled".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# The folder trees of the resolution rule: {name: {tag: {"steps": [...], "mtime": seconds}}}
TREES = {
    "depth_tags": {"d4": {"steps": [100, 200], "mtime": 3000}, "d12": {"steps": [50, 1500, 900], "mtime": 1000},
                   "d8": {"steps": [700], "mtime": 2000}},
    "d_prefix_wins_over_mtime": {"d2": {"steps": [5], "mtime": 1000}, "custom": {"steps": [9], "mtime": 5000}},
    "prefix_match": {"d12-long": {"steps": [1], "mtime": 1000}, "d20x": {"steps": [3, 20], "mtime": 900}},
    "no_depth_tags_newest": {"small": {"steps": [10], "mtime": 1000}, "big": {"steps": [30, 4], "mtime": 9000},
                             "mid": {"steps": [20], "mtime": 5000}},
    "largest_tag_empty": {"d4": {"steps": [100], "mtime": 1000}, "d12": {"steps": [], "mtime": 2000}},
    "no_tags": {},
}
GSM8K_ROWS = (1, 3, 18, 30, 33)  # short questions of test.jsonl (0-based line numbers)
EXTRACT_CASES = [
    "so she has 18 eggs left.\n#### 18", "#### 1,080", "#### -3", "#### 10.", "#### 3.14 is pi",
    "#### 5 and later #### 6", "####5", "#### .5", "The answer is 42", "", "#### ١٢", "#### $40",
    "#### 1,2,3", "#### -", "#### --7", "total\n####  7", "#### 0.50", "#### 7<|assistant_end|>",
    "<|python_start|>12*3<|python_end|><|output_start|>36<|output_end|>\n#### 36",
]
CALCULATOR_CASES = [
    "12*3", "10/4", "7/7", "10//4", "1,000*3", "(2+3)*4", "-5+2", " 3 + 4 ", "2**10", "1/0", "", "3 4", "007",
    "5.", ".5*2", "(1)(2)", "1-", "--3", "'strawberry'.count('r')", "\"banana\".count(\"an\")",
    "'ab'.count('a') + 1", "len('abc')", "__import__('os')", "'x'.count('x'", "12 * 3.5", "100-99.9",
    "0.1+0.2", "123456789*987654321", "((((1))))", "2*-3",
]
CHAT_PROMPT = "What is 2+3?"


def build_tree(root: Path, spec: dict) -> None:
    root.mkdir(parents=True)
    for tag, info in spec.items():
        folder = root / tag
        folder.mkdir()
        for step in info["steps"]:
            (folder / f"model_{step:06d}.pt").write_bytes(b"")
            (folder / f"meta_{step:06d}.json").write_text("{}")
        os.utime(folder, (info["mtime"], info["mtime"]))


def folder_rule(cm) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in TREES.items():
            root = Path(tmp) / name / "chatsft_checkpoints"
            build_tree(root, spec)
            try:
                tag = cm.find_largest_model(str(root))
                step = cm.find_last_step(str(root / tag))
                out[name] = {"tag": tag, "step": step}
            except FileNotFoundError as e:
                out[name] = {"error": type(e).__name__, "message": str(e).replace(str(root), "<root>")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nanochat-src", required=True)
    p.add_argument("--fixture", required=True)
    p.add_argument("--gsm8k", required=True)
    p.add_argument("--samples", required=True, help="folder with arc_handmade.jsonl and mmlu_handmade.jsonl (tests/golden/nanochat_tasks)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    src = Path(args.nanochat_src).resolve()
    fixture = Path(args.fixture).resolve()
    sys.path.insert(0, str(src))
    os.environ["NANOCHAT_BASE_DIR"] = str(fixture)  # get_tokenizer() reads <base>/tokenizer/
    torch.manual_seed(0)

    import nanochat.checkpoint_manager as cm
    from nanochat.engine import Engine, use_calculator
    from scripts.chat_eval import run_categorical_eval
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K, extract_answer
    from tasks.mmlu import MMLU

    commit = (src / "COMMIT").read_text().strip() if (src / "COMMIT").is_file() else subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.device("cpu")
    model, tokenizer, meta = cm.load_model_from_dir(str(fixture / "base_checkpoints"), device, phase="eval")
    tag = cm.find_largest_model(str(fixture / "base_checkpoints"))
    resolved = {"tag": tag, "step": cm.find_last_step(str(fixture / "base_checkpoints" / tag))}

    rows = [json.loads(line) for line in Path(args.gsm8k).read_text().splitlines() if line.strip()]
    gsm = GSM8K.__new__(GSM8K)  # nanochat's task without its hub download: our rows as its dataset
    gsm.start, gsm.stop, gsm.step, gsm.ds = 0, None, 1, rows
    gold = [extract_answer(gsm[i]["messages"][-1]["content"][-1]["text"]) for i in range(len(rows))]

    engine = Engine(model, tokenizer)
    fixture_rows = []
    for i in GSM8K_ROWS:
        conversation = gsm[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=48, temperature=0.0)
        completion = results[0][len(prompt):]
        text = tokenizer.decode(completion)
        fixture_rows.append({"row": i, "prompt": prompt, "completion": completion, "text": text,
                             "extracted": extract_answer(text), "gold": gold[i],
                             "correct": gsm.evaluate(conversation, text)})

    def categorical(task_cls, path: Path, **attrs) -> dict:
        task = task_cls.__new__(task_cls)
        task.start, task.stop, task.step = 0, None, 1
        task.ds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for k, v in attrs.items():
            setattr(task, k, v)
        predicted = []
        evaluate = task.evaluate

        def recording(conversation, response):
            predicted.append(response)
            return evaluate(conversation, response)

        task.evaluate = recording
        accuracy = run_categorical_eval(task, tokenizer, model, batch_size=8)
        return {"file": path.name, "predicted": predicted, "accuracy": accuracy,
                "gold": [task[i]["messages"][-1]["content"] for i in range(len(task.ds))]}

    samples = Path(args.samples)
    arc = categorical(ARC, samples / "arc_handmade.jsonl")
    mmlu = categorical(MMLU, samples / "mmlu_handmade.jsonl", subset="all", split="test")

    bos = tokenizer.get_bos_token_id()
    conv = [bos, tokenizer.encode_special("<|user_start|>"), *tokenizer.encode(CHAT_PROMPT),
            tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|assistant_start|>")]
    yielded = [column[0] for column, _ in engine.generate(conv, num_samples=1, max_tokens=64, temperature=0.0,
                                                         top_k=50)]

    sampled = [column[0] for column, _ in engine.generate(conv, num_samples=1, max_tokens=64, temperature=0.6,
                                                         top_k=50, seed=42)]  # chat_cli's defaults

    record = {
        "nanochat_commit": commit,
        "fixture": fixture.name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(), "torch": torch.__version__,
        "trees": TREES, "folder_rule": folder_rule(cm), "resolved": resolved,
        "gsm8k_file": Path(args.gsm8k).name, "gsm8k_gold": gold,
        "gsm8k_extract": [{"text": t, "extracted": extract_answer(t)} for t in EXTRACT_CASES],
        "calculator": [{"expr": e, "result": None if (r := use_calculator(e)) is None else str(r)}
                       for e in CALCULATOR_CASES],
        "gsm8k_fixture": fixture_rows, "arc_fixture": arc, "mmlu_fixture": mmlu,
        "chat_fixture": {"prompt": CHAT_PROMPT, "conversation": conv, "max_tokens": 64, "generated": yielded,
                         "text": tokenizer.decode([t for t in yielded
                                                   if t not in (bos, tokenizer.encode_special("<|assistant_end|>"))]),
                         "sampled": {"temperature": 0.6, "top_k": 50, "seed": 42, "generated": sampled}},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: arc {arc['accuracy']:.2f} mmlu {mmlu['accuracy']:.2f} "
          f"gsm8k extracted {[r['extracted'] for r in fixture_rows]} chat {len(yielded)} tokens")


if __name__ == "__main__":
    main()
