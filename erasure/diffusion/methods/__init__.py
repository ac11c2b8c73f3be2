"""Built-in diffusion erasure methods (each module registers itself)."""

from erasure.diffusion.methods import esd, rece, rl, salun, salun_adv, text_remap, uce  # noqa: F401
