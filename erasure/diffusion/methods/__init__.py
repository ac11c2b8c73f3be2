"""Built-in diffusion erasure methods (each module registers itself)."""

from erasure.diffusion.methods import esd, rl, salun  # noqa: F401
