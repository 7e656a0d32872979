"""The model: nanochat's GPT with TransformerLens hook points (gpt.py), its TransformerLens surface
(lens.py), the KV cache (kv_cache.py), sampling (engine.py) and teacher-forced scoring of completions
(scoring.py). Imports nothing else of aquainterp."""
