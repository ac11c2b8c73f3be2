"""BE: Boundary Expanding (Chen et al., CVPR 2023, "Boundary Unlearning", https://arxiv.org/abs/2303.11570).

The head gets one extra "shadow" class; the model is fine-tuned to put the forget set into it, then (as the
paper describes, and by default here) the shadow neuron is pruned, leaving the forget samples near the old decision
boundaries. The official SalUn code (``Classification/unlearn/boundary_ex.py``) never prunes it: its model keeps
K+1 outputs and its UA counts a forget sample sent to the shadow class as forgotten, which can only raise UA over
the pruned model's. ``prune_shadow=False`` reproduces that (the returned model then has K+1 outputs). SalUn's runs:
10 epochs, learning rate 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import IterativeConfig, UnlearnContext, data_batches, field, run_optim
from erasure.classification.registry import register_method


@dataclass
class BoundaryExpandConfig(IterativeConfig):
    """Boundary Expanding.

    Args:
        prune_shadow (`bool`, defaults to `True`): remove the shadow neuron after training (the paper); False keeps
            it, as the official SalUn code does, so accuracy is taken over K+1 logits.
    """

    epochs: int = field(10, help="epochs over the forget set")
    lr: float = field(1e-5, help="learning rate")
    prune_shadow: bool = field(True, help="prune the shadow class after training (False: keep K+1 outputs, as the "
                               "official SalUn code)")


def boundary_expand(model: nn.Module, ctx: UnlearnContext, cfg: BoundaryExpandConfig) -> nn.Module:
    old: nn.Linear = model.fc
    k = old.out_features
    wide = nn.Linear(old.in_features, k + 1, bias=old.bias is not None)
    with torch.no_grad():
        wide.weight[:k] = old.weight
        if old.bias is not None:
            wide.bias[:k] = old.bias
    model.fc = wide
    try:
        run_optim(model, cfg, ctx, data_batches(ctx.forget, cfg.batch_size, ctx.generator(1)),
                  lambda m, x, y: F.cross_entropy(m(x), torch.full_like(y, k)), augment=False)
    except BaseException:
        model.fc = old
        raise
    if cfg.prune_shadow:
        pruned = nn.Linear(old.in_features, k, bias=old.bias is not None)
        with torch.no_grad():
            pruned.weight.copy_(model.fc.weight[:k])
            if old.bias is not None:
                pruned.bias.copy_(model.fc.bias[:k])
        model.fc = pruned
    return model


register_method("boundary_expand", BoundaryExpandConfig, boundary_expand, paper="https://arxiv.org/abs/2303.11570")
