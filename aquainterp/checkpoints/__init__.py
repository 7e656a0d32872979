"""Checkpoint formats: ours (native.py: safetensors + JSON, atomic), the checks run before loading one
(guard.py), nanochat's own folders and tokenizer.pkl (nanochat.py, nanochat_tokenizer.py), Hugging Face's
NanoChat directory and TransformerLens's bridge on it (huggingface.py), and load.py, which opens any of
them. Imports point to model/ and the tokenizer, never back."""
