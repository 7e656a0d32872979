"""Command-line plumbing: the `aquainterp` entry point (main.py), argument types and one-line errors
(args.py), settings dataclasses as flags (settings.py), run folders and the output rule (rundir.py), and
`aquainterp info` (info.py). Nothing here imports torch at module level, so `aquainterp --help` is fast."""
