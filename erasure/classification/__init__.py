"""Classification unlearning backend (SalUn's image-classification half).

Methods are registered modules under :mod:`erasure.classification.methods`; the saliency mask and the
masked update are shared with the diffusion engine (:mod:`erasure.saliency`, :mod:`erasure.masked`).

Example::

    from erasure.classification import ClsUnlearnConfig, Workspace, resolve_method_config, run_method

    setup = ClsUnlearnConfig(dataset="digits", scenario="class", forget_class=[3], method="salun")
    ws = Workspace.create(setup)
    original, _ = ws.original(seed=0)
    split = ws.split(seed=0)
    model, record = run_method(ws, "salun", resolve_method_config("salun", "digits", "class"), 0, original, split)
"""

from erasure.classification.config import ClsBenchConfig, ClsTrainConfig, ClsUnlearnConfig, OptimConfig, TrainRecipe
from erasure.classification.methods import METHODS, UnlearnContext, get_method, register_method
from erasure.classification.pipeline import Workspace, resolve_method_config, run_method

__all__ = ["ClsBenchConfig", "ClsTrainConfig", "ClsUnlearnConfig", "OptimConfig", "TrainRecipe", "METHODS",
           "UnlearnContext", "get_method", "register_method", "Workspace", "resolve_method_config", "run_method"]
