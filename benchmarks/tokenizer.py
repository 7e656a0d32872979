"""Tokenizer benchmark, all measured side by side in one run on GSM8K train+test text:

- training time: ours (aquainterp._rustbpe) vs PyPI `rustbpe` (nanochat's) vs HF `tokenizers` BpeTrainer,
  same split pattern, at vocab sizes 4096 and 16384 (special tokens included);
- encoding throughput: ours vs HF `tokenizers` loading our exported tokenizer.json (same ids).

PyPI rustbpe is not a project dependency: `.venv/bin/pip install rustbpe` to include it.
Run: .venv/bin/python -m benchmarks.tokenizer [--repeats 3] [--vocab-sizes 4096 16384]
Times are the best of --repeats runs (wall clock, all cores).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from aquainterp import _rustbpe
from aquainterp.cli.main import normalize_flag_spelling
from aquainterp.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


def load_texts(data_dir: Path) -> list[str]:
    texts = []
    for split in ("train", "test"):
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            sys.exit(f"benchmarks/tokenizer.py: {path} not found (pass --data-dir)")
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row["question"], row["answer"]]
    return texts


def best_time(repeats: int, fn, *args, **kwargs) -> tuple[float, object]:
    """Best wall time of fn(*args, **kwargs) over `repeats` runs, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return min(times), result


def train_ours(texts, vocab_size):
    return _rustbpe.Bpe.train(iter(texts), vocab_size)


def train_pypi_rustbpe(texts, vocab_size):
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    return tok


def train_hf(texts, vocab_size):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter(texts), trainer)
    return tok


def encode_each(encode, texts):
    return [encode(t) for t in texts]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    args = parser.parse_args(normalize_flag_spelling(sys.argv[1:] if argv is None else argv))

    texts = load_texts(args.data_dir)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: GSM8K train+test, {len(texts)} texts, {mb:.2f} MB; {os.cpu_count()} CPUs; "
          f"best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    try:
        import rustbpe  # noqa: F401

        have_pypi = True
    except ImportError:
        have_pypi = False
        print("PyPI rustbpe not installed: `.venv/bin/pip install rustbpe` to compare with it (skipped)")

    for vocab_size in args.vocab_sizes:
        print(f"\n== vocab_size {vocab_size} ==")
        t_ours, bpe = best_time(args.repeats, train_ours, texts, vocab_size)
        print(f"train  ours            {t_ours:7.3f} s")
        if have_pypi:
            t_pypi, pypi = best_time(args.repeats, train_pypi_rustbpe, texts, vocab_size)
            ranks = sorted(pypi.get_mergeable_ranks(), key=lambda kv: kv[1])
            same = [bytes(k) for k, _ in ranks] == bpe.token_bytes()
            print(f"train  PyPI rustbpe    {t_pypi:7.3f} s   ours is {t_pypi / t_ours:5.2f}x as fast "
                  f"(identical vocabulary: {same})")
        t_hf, _ = best_time(args.repeats, train_hf, texts, vocab_size)
        print(f"train  HF BpeTrainer   {t_hf:7.3f} s   ours is {t_hf / t_ours:5.2f}x as fast")

        tok = Tokenizer(bpe)
        hf = tok.hf_tokenizer()
        t_ours_b, ours_ids = best_time(args.repeats, tok.encode_batch, texts)
        t_hf_b, hf_enc = best_time(args.repeats, hf.encode_batch, texts, add_special_tokens=False)
        same = ours_ids == [e.ids for e in hf_enc]
        print(f"encode_batch  ours {mb / t_ours_b:6.2f} MB/s   HF {mb / t_hf_b:6.2f} MB/s   "
              f"ours is {t_hf_b / t_ours_b:5.2f}x as fast (same ids: {same})")
        sample = texts[:2000]
        smb = sum(len(t.encode()) for t in sample) / 1e6
        t_ours_1, _ = best_time(args.repeats, encode_each, tok.encode, sample)
        t_hf_1, _ = best_time(args.repeats, encode_each, hf.encode, sample)
        print(f"encode (one text per call, 2000 texts)  ours {smb / t_ours_1:6.2f} MB/s   "
              f"HF {smb / t_hf_1:6.2f} MB/s   ours is {t_hf_1 / t_ours_1:5.2f}x as fast")
        tokens = statistics.mean(len(ids) for ids in ours_ids)
        print(f"mean tokens per text: {tokens:.1f}")


if __name__ == "__main__":
    main()
