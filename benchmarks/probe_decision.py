"""Do the letter probes describe the answer the model gives? The two decision reads side by side.

    .venv/bin/python benchmarks/probe_decision.py --checkpoint runs/demo/rl/checkpoints --difficulty 1

On held-out synthetic problems, the checkpoint's greedy completions give the letters it states and
whether each is right. Each read ("completion": the answer step of that completion, the default;
"direct": right after "Answer:" in a prompt without rationale) is then scored on how well it describes
that behaviour:
    agreement   its top letter logit is the letter the completion states
    sign        gold margin > 0 exactly when the stated answer is right
    AUC         gold margin as a score for "the stated answer is right" (0.5 = chance)
    letter mass probability of the five letter tokens at that position (full vocabulary softmax)
    gold margin mean +- std, and how many problems each read's argmax puts on its most common letter.
Both reads run in one process on the same problems; "ratio" columns divide completion by direct.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from aquainterp.checkpoints.load import load_model  # noqa: E402
from aquainterp.cli.main import normalize_flag_spelling  # noqa: E402
from aquainterp.tasks import LETTERS  # noqa: E402
from aquainterp.tasks.synthetic import SyntheticTask  # noqa: E402
from probes.suite import DECISIONS, ProbeSuite  # noqa: E402


def auc(scores: list[float], positive: list[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN if one class
    is empty."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir (e.g. runs/demo/rl/checkpoints)")
    parser.add_argument("--difficulty", type=int, default=None, help="synthetic difficulty (default: mixed)")
    parser.add_argument("--n", type=int, default=64, help="held-out problems")
    parser.add_argument("--start", type=int, default=1000, help="first index in the eval split (default 1000: "
                        "beyond what the demo evaluates)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(normalize_flag_spelling(list(sys.argv[1:] if argv is None else argv)))
    if args.n < 2 or args.start < 0:
        parser.error("--n must be >= 2 and --start >= 0")
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.checkpoint, device="cpu")
    model.eval()
    problems = SyntheticTask(seed=args.seed, split="eval", difficulty=args.difficulty).problems(args.start + args.n)
    problems = problems[args.start:]

    rows = {}
    written = None
    for decision in DECISIONS:
        suite = ProbeSuite(model, tokenizer, problems, probes=("margin", "counts"), batch_size=16,
                           max_new_tokens=args.max_new_tokens, hardest_k=0, progress=False, decision=decision)
        suite.run(0, table=False)
        raw = suite.last_raw
        if decision == "completion":  # the letters stated come from this read's greedy completions
            written = raw["written"]
        answered = raw["answered"]
        stated = [written[i] for i in answered]
        gold = [suite.items[i].gold for i in answered]
        keep = [k for k, w in enumerate(stated) if w is not None]
        margin = [float(raw["letter_gold_margin"][k]) for k in keep]
        right = [stated[k] == gold[k] for k in keep]
        predicted = [int(raw["predicted"][k]) for k in keep]
        with torch.no_grad():
            mass = []
            for ids, item_index in zip(raw["decision_ids"], answered):
                probs = torch.softmax(model(torch.tensor([ids]), logits_at=torch.tensor([len(ids) - 1]))[0], -1)
                mass.append(float(probs[list(suite.items[item_index].letter_ids)].sum()))
        top_letter, top_count = Counter(predicted).most_common(1)[0]
        rows[decision] = {
            "read": len(keep), "agreement": sum(p == stated[k] for p, k in zip(predicted, keep)) / len(keep),
            "sign": sum((m > 0) == r for m, r in zip(margin, right)) / len(keep), "auc": auc(margin, right),
            "mass": statistics.mean(mass), "gm_mean": statistics.mean(margin), "gm_std": statistics.pstdev(margin),
            "top": f"{LETTERS[top_letter]} x{top_count}"}
    accuracy = sum(w == p.correct for w, p in zip((LETTERS[w] if w is not None else None for w in written),
                                                     problems)) / len(problems)
    stated_counts = Counter(LETTERS[w] for w in written if w is not None)
    print(f"checkpoint {args.checkpoint}: {len(problems)} held-out problems (eval split from index {args.start}), "
          f"greedy accuracy {accuracy:.3f}; letters stated {dict(sorted(stated_counts.items()))}")
    print(f"{'read':12s} {'problems':>8s} {'agreement':>9s} {'sign':>6s} {'AUC':>6s} {'letter mass':>11s} "
          f"{'gold margin':>15s} {'argmax mode':>11s}")
    for decision, r in rows.items():
        print(f"{decision:12s} {r['read']:8d} {r['agreement']:9.3f} {r['sign']:6.3f} {r['auc']:6.3f} "
              f"{r['mass']:11.3f} {r['gm_mean']:+7.2f} +- {r['gm_std']:4.2f} {r['top']:>11s}")
    c, d = rows["completion"], rows["direct"]
    print(f"ratio completion/direct: agreement {c['agreement'] / d['agreement']:.2f}x, "
          f"sign {c['sign'] / d['sign']:.2f}x, letter mass {c['mass'] / d['mass']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
