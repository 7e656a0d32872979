"""Activation patching: the sweeps (patcher.py), clean/corrupt pairs from the tasks (pairs.py) and from the
model's own completions (completion_pairs.py), attribution patching (attribution.py), the same sweep over
a run's checkpoints (series.py), the HTML/JSON report (report.py) and the `aquainterp patch` command
(command.py)."""
