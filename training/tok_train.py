"""Train the BPE tokenizer (rustbpe) on a text source and report its compression on each task.

    python -m training.tok_train --data hf:HuggingFaceFW/fineweb-edu:sample-10BT --vocab-size 65536
    python -m training.tok_train --data synthetic --vocab-size 1024 --max-chars 2000000   # toy

Compression is UTF-8 bytes per token on held-out text of every task we train on (more is better):
synthetic eval-split problems always, AQuA-RAT and GSM8K when --aqua / --gsm8k name a source.
Documents are the same plain-text rendering base training sees (question, options, rationale).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.common import parse_config


@dataclass
class TokTrainConfig:
    data: str = "synthetic"
    text_field: str = "text"
    out_dir: str = "runs/tokenizer"
    vocab_size: int = 65536
    max_chars: int = 2_000_000_000
    doc_cap: int = 10_000  # characters kept of each document (nanochat's cap)
    eval_docs: int = 500
    aqua: str | None = None
    gsm8k: str | None = None
    gsm8k_split: str = "test"
    overwrite: bool = False  # replace files in out_dir that tok_train did not write (or that changed since)


OWNER = "python -m training.tok_train"


def capped_texts(source: str, max_chars: int, doc_cap: int, text_field: str = "text") -> Iterator[str]:
    from training.data import documents

    total = 0
    for text in documents(source, text_field=text_field):
        text = text[:doc_cap]
        yield text
        total += len(text)
        if total >= max_chars:
            return


def heldout_texts(config: TokTrainConfig) -> dict[str, list[str]]:
    """Held-out documents per task, rendered as plain text."""
    from aquainterp.tasks.synthetic import SyntheticTask, document

    out = {"synthetic": [document(p) for p in SyntheticTask(seed=0, split="eval").problems(config.eval_docs)]}
    if config.aqua:
        from aquainterp.tasks.aqua import load_aqua

        out["aqua"] = [document(p) for p in load_aqua(config.aqua, split="validation")[: config.eval_docs]]
    if config.gsm8k:
        from aquainterp.tasks.gsm8k import load_gsm8k

        out["gsm8k"] = [f"{p.question}\n{p.solution}\nAnswer: {p.answer}\n"
                        for p in load_gsm8k(config.gsm8k, split=config.gsm8k_split)[: config.eval_docs]]
    return out


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return n_bytes / max(n_tokens, 1)


def run(config: TokTrainConfig) -> dict:
    """Train, save to out_dir (tokenizer.json + compression.json), return {task: bytes per token}."""
    from tqdm.auto import tqdm

    from aquainterp.cli.rundir import claim_output, record_written, write_output
    from aquainterp.tokenizer import Tokenizer

    # where the tokenizer goes is checked before training: a new folder or tok_train's own, never a
    # checkpoint's tokenizer/ or one of the text sources it reads (aquainterp.cli.rundir)
    sources = [s for s in (config.data, config.aqua, config.gsm8k) if s and Path(s).exists()]
    out_dir = claim_output(config.out_dir, "--out-dir", owner=OWNER, kind="dir", inputs=sources,
                           overwrite=config.overwrite)
    t0 = time.perf_counter()
    texts = tqdm(capped_texts(config.data, config.max_chars, config.doc_cap, config.text_field),
                 desc="tokenizer text", unit="doc")
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=config.vocab_size)
    train_s = time.perf_counter() - t0
    tokenizer.save(out_dir)
    record_written([out_dir], OWNER)
    report = {name: bytes_per_token(tokenizer, docs) for name, docs in heldout_texts(config).items()}
    summary = {"vocab_size": tokenizer.vocab_size, "train_seconds": train_s, "bytes_per_token": report,
               "data": config.data, "fingerprint": tokenizer.fingerprint()}
    write_output(out_dir / "compression.json", json.dumps(summary, indent=1), OWNER)
    print(f"tokenizer: vocab {tokenizer.vocab_size:,}, trained in {train_s:.1f}s, saved to {out_dir}")
    print("| task | bytes/token |\n| --- | --- |")
    for name, bpt in report.items():
        print(f"| {name} | {bpt:.3f} |")
    return report


def main(argv: list[str] | None = None) -> None:
    from training.common import run_cli

    run_cli(run, parse_config(TokTrainConfig, argv, __doc__.split("\n")[0], prog="python -m training.tok_train"),
            "python -m training.tok_train")


if __name__ == "__main__":
    main()

