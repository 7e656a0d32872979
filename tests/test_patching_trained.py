"""Activation patching on a tiny GPT trained here on the synthetic task: the heatmaps are not uniform.

The model (depth 2, 4 heads of 32) learns the "checked" chat style (rationale, option checks up to the
matching one, "Answer: X") for 80 AdamW steps. Patched at the decision position after its own checks, with
Gaussian noise on the question and the options, it shows one route for the answer: the last layer's
attention at the decision token reads it from a few problem tokens (mostly one head); no other position's
attention output and no first-layer head matters, and before that layer the decision token's residual
stream does not hold it. The demo's SFT checkpoint has the same shape one layer earlier (docs/patching.md).
"""

import pytest
import torch
from tasks_tokenizer import trained_tokenizer

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.patching.pairs import make_pairs
from aquainterp.patching.patcher import Patcher
from aquainterp.tasks import conversation
from aquainterp.tasks.synthetic import SyntheticTask


def train_checked(tokenizer, steps=80, batch=32, lr=3e-3, seed=0, make_conversation=None) -> GPT:
    """A depth-2 GPT fine-tuned from nanochat's init on checked conversations (loss on the assistant's
    tokens only), AdamW with the last 30% of steps decaying linearly to 0. make_conversation: another
    MCProblem -> conversation recipe (tests/faith_policies.py trains policies with known habits)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=160, head_dim=32))
    model.init_weights()
    problems = SyntheticTask(seed=1, split="train", difficulty=1).problems(steps * batch)
    make_conversation = make_conversation or (lambda p: conversation(p, "checked"))
    rows = [tokenizer.render_conversation(make_conversation(p)) for p in problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(steps):
        chunk = rows[step * batch: (step + 1) * batch]
        width = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(batch, width, dtype=torch.long)
        y = torch.full((batch, width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(chunk):
            ids, mask = torch.tensor(ids), torch.tensor(mask)
            x[i, : len(ids) - 1] = ids[:-1]
            y[i, : len(ids) - 1] = torch.where(mask[1:] == 1, ids[1:], -1)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (steps - step) / (0.3 * steps))
        loss = model(x, targets=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_checked_model_reads_the_problem_into_the_decision_token_by_last_layer_attention():
    tokenizer = trained_tokenizer()
    model = train_checked(tokenizer)
    problems = SyntheticTask(seed=0, split="eval", difficulty=1).problems(8)
    pairs, skipped = make_pairs(tokenizer, problems, "noise", style="checked")
    assert not skipped and len(pairs) == 8
    patcher = Patcher(model, pairs, batch_size=64, align="end", progress=False)
    # Trained: the gold letter beats every other letter after the model's own checks, and blurring the
    # problem statement costs a clear part of that margin.
    assert (patcher.clean_ld > 0).all()
    assert patcher.scale > 0.25 * patcher.clean_ld.mean()

    attn = patcher.sweep("attn_out").normalized  # [layer, pos], the last column is the decision token
    assert attn[-1, -1] >= 0.8  # the last layer's attention output at the decision token restores it
    assert attn[:, :-1].abs().max() <= 0.1  # no other position's attention output matters

    heads = patcher.sweep("z").normalized  # [layer, head]
    assert heads[-1].max() >= 0.5  # mostly one head of the last layer ...
    assert heads[:-1].abs().max() <= 0.1  # ... and none of the first layer

    resid = patcher.sweep("resid_pre").normalized  # [layer, pos]
    assert resid[-1, -1] <= 0.2  # before that attention, the decision token does not hold the answer yet
    assert resid.max() >= 0.3 and resid.abs().median() <= 0.05  # a few problem tokens do: not a uniform map
