"""Acceptance: a depth-2 model goes tokenizer -> base -> mid -> SFT on the synthetic task on CPU, each
stage starting from the previous stage's checkpoint, and SFT is evaluated on held-out problems."""

import json

import pytest

from aquainterp.checkpoints.load import load_model
from aquainterp.evaluate import evaluate
from aquainterp.tasks.synthetic import SyntheticTask
from training.base import BaseConfig
from training.base import run as run_base
from training.mid import MidConfig
from training.mid import run as run_mid
from training.sft import SFTConfig
from training.sft import run as run_sft
from training.tok_train import TokTrainConfig
from training.tok_train import run as run_tok

CPU = dict(device="cpu", compile="off", bf16="off")
BASE_STEPS, MID_STEPS, SFT_STEPS = 150, 60, 150


def rationale_match_rate(model, tok, problems) -> float:
    """Share of held-out problems whose greedy "reasoning" completion writes the gold rationale exactly."""
    from aquainterp.model.engine import Engine
    from aquainterp.tasks import conversation

    end = tok.encode_special("<|assistant_end|>")
    hits = 0
    for p in problems:
        g = Engine(model).generate(tok.render_for_completion(conversation(p, "reasoning")), max_new_tokens=96,
                                   temperature=0.0, stop_tokens=[end])
        text = tok.decode(g.completions[0]).replace("<|assistant_end|>", "")
        hits += text.split("\nAnswer:")[0].strip() == p.rationale.strip()
    return hits / len(problems)


@pytest.mark.slow
def test_base_mid_sft_on_cpu(tmp_path):
    run_tok(TokTrainConfig(data="synthetic", out_dir=str(tmp_path / "tok"), vocab_size=512, max_chars=400_000,
                           eval_docs=50))
    base = run_base(BaseConfig(run_dir=str(tmp_path / "base"), tokenizer_dir=str(tmp_path / "tok"), depth=2,
                               aspect_ratio=64, head_dim=64, seq_len=256, device_batch_size=8,
                               total_batch_tokens=4096, max_steps=BASE_STEPS, eval_every=0, save_every=10**6,
                               val_docs=32, **CPU))
    mid = run_mid(MidConfig(init_from=str(tmp_path / "base" / "checkpoints"), run_dir=str(tmp_path / "mid"),
                            synthetic=3000, device_batch_size=8, total_batch_tokens=4096, max_steps=MID_STEPS,
                            save_every=10**6, **CPU))
    sft = run_sft(SFTConfig(init_from=str(tmp_path / "mid" / "checkpoints"), run_dir=str(tmp_path / "sft"),
                            synthetic=5000, device_batch_size=16, examples_per_step=32, max_steps=SFT_STEPS,
                            init_lr_frac=0.5, eval_every=0, eval_synthetic=200, save_every=10**6, **CPU))
    print(json.dumps({"base": base, "mid": mid, "sft": sft}, indent=1))

    # each stage started from the one before and kept the tokenizer
    _, _, mid_meta = load_model(tmp_path / "mid" / "checkpoints")
    model, tok, sft_meta = load_model(tmp_path / "sft" / "checkpoints")
    assert mid_meta["init_from"]["step"] == BASE_STEPS and sft_meta["init_from"]["step"] == MID_STEPS
    assert sft_meta["tokenizer_fingerprint"] == mid_meta["tokenizer_fingerprint"]

    assert base["val/bpb"] < 0.6  # measured 0.45 with these settings; the untrained model is ~6
    acc = sft["eval/synthetic_categorical_acc"]
    problems = SyntheticTask(seed=1, split="eval").problems(200)
    assert evaluate(model, tok, problems, mode="categorical").accuracy == acc  # the reloaded checkpoint agrees
    generative = evaluate(model, tok, problems[:50], mode="generative", max_new_tokens=96)
    rationale = rationale_match_rate(model, tok, problems[:50])
    print(f"SFT held-out synthetic: categorical {acc:.3f}, generative {generative.accuracy:.3f} (chance 0.2), "
          f"rationale exact {rationale:.2f}")
    assert generative.answered / generative.samples >= 0.9  # the chat format and "Answer: X" are learned
    # The arithmetic is learned (measured 0.76 exact rationales on unseen problems; chance ~0). Picking the
    # option letter is NOT learned at this budget: categorical accuracy stays at chance (measured 0.135-0.25),
    # so no threshold on it is asserted here; see the issue-6 report.
    assert rationale >= 0.5
