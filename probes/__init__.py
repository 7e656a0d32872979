"""Probes: read hooked activations or logits, return metric dicts named as in docs/design.md.

One module per probe, each pure tensor math tested against ground truth:
    entropy.py      attention entropy of hook_pattern rows (and normalised by log #visible keys)
    option_mass.py  attention from the decision position onto each option's token span
    margin.py       letter logit margins at the decision position (top - runner-up, gold - best other)
    kl.py           KL(policy || frozen reference): five-letter and full-vocab along completions
    counts.py       predicted-letter counts (mode-collapse watch)
    logit_lens.py   the gold-letter margin read from every layer's residual stream at the decision
and the plumbing that runs them on a fixed probe set:
    probe_set.py    probe items (prompts, option spans, letter ids from aquainterp.tasks) and the
                    decision rows: prompt + own completion cut at "Answer:", or the direct prompt
    decision.py     batched hooked forwards reading every probe at each row's decision position
    reference.py    freeze_reference(model, device): the pre-RL copy (CPU offload option)
    suite.py        ProbeSuite(model, tokenizer, problems, probes=..., reference_model=...).run(step)
    figures.py      plotly attention-pattern grids and layer×head heatmaps
"""
