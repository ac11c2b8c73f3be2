"""CLIP score of generated images against their prompts, with open_clip.

``CLIPScore = 100 * max(cos(image_embedding, text_embedding), 0)`` per image (the torchmetrics definition),
averaged over images. Weights come from ``--weights PATH`` (an open_clip/OpenAI checkpoint file for
``--arch``) or, when online, an open_clip pretrained tag (``--pretrained openai``). Offline without a weights
file the metric stops with a clear error instead of scoring with random weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

from erasure_eval.base import MetricError, load_rgb, register_metric

logger = logging.getLogger(__name__)

__all__ = ["ClipScoreMetric", "load_clip"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_clip(arch: str, weights: str | None = None, pretrained: str | None = None, config: str | None = None,
              device: str = "cpu"):
    """Return ``(model, preprocess, tokenizer)``.

    Args:
        arch (`str`): open_clip architecture name (``ViT-L-14``, ``ViT-B-32``, ...).
        weights (`str`, *optional*): checkpoint file for ``arch``.
        pretrained (`str`, *optional*): open_clip pretrained tag, downloaded from the hub (needs network).
        config (`str`, *optional*): a JSON model config (registered under ``arch``) for custom architectures.
    """
    import open_clip

    if config:
        if not os.path.isfile(config):
            raise MetricError(f"CLIP model config not found: {config}")
        try:
            with open(config, encoding="utf-8") as fh:
                json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise MetricError(f"{config} is not a JSON open_clip model config: {err}") from err
        if os.path.splitext(os.path.basename(config))[0] != arch:
            raise MetricError(f"open_clip names a config file's model after the file: rename {config} to {arch}.json")
        open_clip.add_model_config(config)
    if arch not in open_clip.list_models():
        raise MetricError(f"unknown open_clip architecture {arch!r} (see open_clip.list_models(), or pass --clip-config)")
    if weights:
        if not os.path.isfile(weights):
            raise MetricError(f"CLIP weights file not found: {weights}")
        source = weights
    elif pretrained:
        if _offline():
            raise MetricError(
                f"CLIP weights {arch}/{pretrained} must be downloaded but HF_HUB_OFFLINE=1; pass --weights PATH"
            )
        source = pretrained
    else:
        raise MetricError(
            "the clip metric needs weights: pass --weights PATH (an open_clip checkpoint for --arch) or, "
            "when online, --pretrained TAG (e.g. --arch ViT-L-14 --pretrained openai)"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=source, device=device)
    except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError/HF errors/OSError
        raise MetricError(f"cannot load CLIP {arch} weights from {source}: {err}") from err
    tokenizer = open_clip.get_tokenizer(arch)
    return model.eval(), preprocess, tokenizer


@register_metric("clip")
class ClipScoreMetric:
    """open_clip CLIP score (image vs its prompt).

    Args:
        arch (`str`, defaults to `"ViT-L-14"`): open_clip architecture.
        weights (`str`, *optional*): checkpoint path; or ``pretrained`` (tag) when online.
        config (`str`, *optional*): JSON config for a custom architecture.
    """

    name: ClassVar[str] = "clip"
    needs_manifest: ClassVar[bool] = True

    def __init__(self, arch: str = "ViT-L-14", weights: str | None = None, pretrained: str | None = None,
                 config: str | None = None, device: str = "cpu", **_: Any) -> None:
        self.arch, self.weights, self.pretrained, self.config, self.device = arch, weights, pretrained, config, device
        if not weights and not pretrained:
            load_clip(arch, None, None, config)  # raises the clear "needs weights" error now
        self._model = None
        self.cache_key = "clip"

    def _load(self):
        if self._model is None:
            self._model = load_clip(self.arch, self.weights, self.pretrained, self.config, self.device)
        return self._model

    def record_config(self) -> dict[str, Any]:
        from erasure.io import file_sha256

        conf: dict[str, Any] = {"arch": self.arch, "formula": "100*max(cos,0)"}
        if self.weights:
            conf["weights"] = os.path.basename(self.weights)
            conf["weights_sha256"] = file_sha256(self.weights)
        else:
            conf["pretrained"] = self.pretrained
        return conf

    def params(self) -> dict[str, Any]:
        return {"arch": self.arch}

    def score_images(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        import torch

        model, preprocess, tokenizer = self._load()
        if any(not it.get("prompt") for it in items):
            raise MetricError("the clip metric needs each image's prompt (manifest 'prompt' field)")
        imgs = torch.stack([preprocess(load_rgb(it["path"])) for it in items]).to(self.device)
        text = tokenizer([it["prompt"] for it in items]).to(self.device)
        with torch.no_grad():
            fi = model.encode_image(imgs).float()
            ft = model.encode_text(text).float()
        fi = fi / fi.norm(dim=-1, keepdim=True)
        ft = ft / ft.norm(dim=-1, keepdim=True)
        cos = (fi * ft).sum(-1)
        return [{"clip_score": float(100.0 * max(c, 0.0)), "cosine": float(c)} for c in cos.tolist()]

    def summarize(self, items: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import statistics

        vals = [r["clip_score"] for r in records]
        return {"clip_score": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
                "images": len(vals), "arch": self.arch}
