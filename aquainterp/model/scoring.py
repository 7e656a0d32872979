"""Scoring completions: teacher-forced logits of continuations of one prompt, shared by RL's training
forward (training/rl.py), the probes' sequence KL (probes/suite.py) and anything else that asks "how
likely is this completion" of the model.

The prompt runs once per group of completions (kv_cache.SharedPrompt), so a group of samples of one
problem costs one prompt forward plus one batch of completion tokens, with autograd through both.
"""

from __future__ import annotations

import torch

from aquainterp.model.kv_cache import SharedPrompt


def completion_targets(completions: list[list[int]]) -> torch.Tensor:
    """[b, longest] completion tokens, -1 on the right padding (the positions that carry no loss)."""
    targets = torch.full((len(completions), max(len(c) for c in completions)), -1, dtype=torch.long)
    for i, comp in enumerate(completions):
        targets[i, : len(comp)] = torch.tensor(comp, dtype=torch.long)
    return targets


def completion_logits(model, prompt: list[int], completions: list[list[int]], pad_id: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits for completions of one prompt: (logits [b, longest, vocab], targets
    [b, longest]) where logits[i, t] predicts targets[i, t] = completions[i][t] (-1 on the padding).

    The prompt runs once (batch 1, SharedPrompt); its last position predicts every completion's first
    token, and the completions (all but their last token) run as one batch against its keys/values.
    Autograd flows through both, so training can use it as well as the probes."""
    if not prompt or not completions or not all(completions):
        raise ValueError("completion_logits: needs a non-empty prompt and non-empty completions")
    device = model.wte.weight.device
    targets = completion_targets(completions).to(device)
    cache = SharedPrompt(model.config.n_layer)
    last = torch.tensor([len(prompt) - 1], device=device)
    first = model(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=cache, logits_at=last)[:, None]
    logits = first.expand(len(completions), -1, -1)
    if targets.size(1) > 1:  # token t of a completion is predicted at its position t - 1
        inputs = targets[:, :-1].masked_fill(targets[:, :-1] < 0, pad_id)
        logits = torch.cat([logits, model(inputs, kv_cache=cache)], dim=1)
    return logits, targets
