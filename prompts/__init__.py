"""Package data: prompt sets and presets (read through erasure.resources)."""
