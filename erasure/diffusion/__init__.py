"""Stable Diffusion backend: pipelines, forget/retain data, losses and the masked fine-tuning loop."""
