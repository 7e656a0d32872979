"""Probes: read hooked activations or logits, return metric dicts named as in DESIGN.md."""
