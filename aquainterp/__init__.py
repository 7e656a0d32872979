"""aquainterp: train nanochat's GPT on AQuA-style multiple-choice math and watch its insides.

The library package. `training`, `probes` and `dashboards` import from here; nothing here imports them
(the `aquainterp` command line in `cli.py` dispatches to them lazily, by module name).
"""

__version__ = "0.1.0"
