"""Inference engines other than HF transformers (vLLM)."""
