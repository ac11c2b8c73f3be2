"""RL baseline (random-label / remapping fine-tuning without a saliency mask), as compared in the SalUn paper.

Same loss, data and knobs as SalUn, but every UNet weight selected by ``trainable`` may change.
"""

from __future__ import annotations

from erasure.diffusion.methods.salun import SalUnConfig, remap_with_retain
from erasure.methods import MethodSpec, register_method

register_method(
    MethodSpec(
        name="rl",
        config_cls=SalUnConfig,
        loss=remap_with_retain,
        description="Concept remapping + retain loss on all trainable weights (no mask).",
        label="RL (random labelling, no mask)",
        paper="https://arxiv.org/abs/2310.12508",
    )
)
