"""Built-in diffusion erasure methods (each module registers itself)."""

from erasure.diffusion.methods import esd, rece, rl, salun, uce  # noqa: F401
