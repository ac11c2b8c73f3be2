"""Package data: the embedded text-to-image models and their judge (read through erasure.resources)."""
