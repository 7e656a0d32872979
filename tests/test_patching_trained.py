"""Patching a GPT trained (here, in a few hundred steps) on the synthetic task: the maps have structure.

A random model's patching maps are noise around 0; a model that reads the options to pick a letter
must carry the answer through specific positions. Trains a depth-2 GPT on decision prompts (loss on the
answer letter only), then sweeps option-permutation pairs. Slow: run with --runslow (CI does).
"""

import pytest
import torch
from tasks_tokenizer import trained_tokenizer
from test_patching import one_thread  # noqa: F401  (autouse fixture)

from aquainterp.model import GPT, GPTConfig
from aquainterp.patching import Patcher, make_pairs
from aquainterp.tasks import decision_prompt
from aquainterp.tasks.synthetic import SyntheticTask


def train_letter_picker(tok, steps=300, batch=32):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    stream = iter(SyntheticTask(seed=1, split="train", difficulty=1))
    for _ in range(steps):
        rows = []
        for problem in (next(stream) for _ in range(batch)):
            ids, letters = decision_prompt(tok, problem)
            rows.append((ids, letters[problem.answer_index]))
        width = max(len(ids) for ids, _ in rows)
        x = torch.zeros(batch, width, dtype=torch.long)
        y = torch.full((batch, width), -1)
        for i, (ids, gold) in enumerate(rows):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, len(ids) - 1] = gold
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_trained_model_patching_maps_are_not_uniform():
    tok = trained_tokenizer()
    model = train_letter_picker(tok)
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(8)
    pairs, _ = make_pairs(tok, problems, "permute")
    patcher = Patcher(model, pairs, batch_size=64, align="end", progress=False)
    assert patcher.clean_ld.mean() > patcher.corrupted_ld.mean()  # it prefers the gold letter's slot
    resid = patcher.sweep("resid_pre").normalized
    heads = patcher.sweep("z").normalized
    labels = patcher.position_labels(tok)
    print("clean/corrupted logit diff", patcher.clean_ld.mean().item(), patcher.corrupted_ld.mean().item())
    for layer in range(resid.shape[0]):
        top = resid[layer].abs().argsort(descending=True)[:5].tolist()
        print(f"resid_pre L{layer}:", [(labels[i], round(resid[layer, i].item(), 3)) for i in top])
    print("z (layer x head):", heads.tolist())
    # Not uniform: a few positions carry the answer, most carry nothing.
    first = resid[0]
    assert first.max() > 0.2 and first.std() > 0.05
    assert (first.abs() < 0.05).float().mean() > 0.5
    # The last position at layer 0 is the same token in both prompts: it carries nothing by itself.
    assert first[-1].abs() < 1e-5
