"""Export: trained adapters merged into standalone weights (safetensors) or written as GGUF (see run.py)."""
