"""Compression of a trained model for serving (LoRA merge + int8 dynamic quantization)."""
