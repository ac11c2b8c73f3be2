"""The shapes judge: a small CNN with three heads (shape, color, fill) that labels generated images.

``load_judge()`` reads ``models/shapes-judge.safetensors`` (weights; the architecture and class names are in
the file's metadata and in ``models/shapes-judge.json``). ``Judge.predict`` returns one dict per image::

    {"shape": "circle", "color": "red", "fill": "striped",
     "shape_conf": 0.99, "color_conf": 1.0, "fill_conf": 0.97}

Images of any size are resized (bicubic) to the judge's input resolution (64 px).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erasure.shapes.render import COLORS, FILLS, SHAPES

__all__ = ["JudgeNet", "Judge", "load_judge", "default_judge_path", "HEADS"]

HEADS: tuple[str, ...] = ("shape", "color", "fill")


def default_judge_path() -> Path:
    """Absolute path of the shipped judge weights (``models/shapes-judge.safetensors``, package data)."""
    from erasure.resources import model_path

    return model_path("shapes-judge.safetensors")


def _block(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class JudgeNet(nn.Module):
    """CNN: 5x5/2 stem, conv stages with max-pooling, global average pool, one linear head per concept.

    Args:
        widths (`tuple[int, ...]`, defaults to `(24, 32, 64, 96, 128)`): channels of the stem and the four conv stages.
        n_classes (`tuple[int, int, int]`): classes per head (shape, color, fill).
    """

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 96, 128), n_classes: tuple[int, int, int] = (6, 6, 4)):
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.features = nn.Sequential(
            _block(3, w0, stride=2, k=5),  # 32x32
            _block(w0, w1),
            nn.MaxPool2d(2),  # 16x16
            _block(w1, w2),
            nn.MaxPool2d(2),  # 8x8
            _block(w2, w3),
            _block(w3, w3),
            nn.MaxPool2d(2),  # 4x4
            _block(w3, w4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.1)
        self.heads = nn.ModuleList([nn.Linear(w4, n) for n in n_classes])
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x``: float ``[n, 3, 64, 64]`` in ``[0, 1]`` -> list of logits, one per head."""
        h = self.dropout(self.features((x - self.mean) * 4.0))
        return [head(h) for head in self.heads]


class Judge:
    """A loaded judge: ``predict`` (labels + confidences) and ``predict_proba`` (full distributions)."""

    def __init__(self, net: JudgeNet, config: dict[str, Any], device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.size = int(config.get("image_size", 64))
        self.classes: dict[str, list[str]] = {h: list(config["classes"][h]) for h in HEADS}

    @torch.no_grad()
    def predict_proba(self, images: list, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Softmax probabilities per head: ``{"shape": [n, 6], "color": [n, 6], "fill": [n, 4]}`` (class order in
        ``self.classes``)."""
        from erasure.shapes.data import to_tensor

        if not isinstance(images, (list, tuple)):
            raise TypeError("images must be a list of PIL images")
        outs: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
        for i in range(0, len(images), batch_size):
            x = to_tensor(images[i : i + batch_size], self.size).to(self.device)
            for h, logits in zip(HEADS, self.net(x)):
                outs[h].append(logits.softmax(-1).cpu())
        return {h: torch.cat(v) if v else torch.empty(0, len(self.classes[h])) for h, v in outs.items()}

    def predict_tensor(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities for a float batch ``[n, 3, 64, 64]`` in ``[0, 1]`` (already at the judge's size)."""
        with torch.no_grad():
            return {h: lg.softmax(-1) for h, lg in zip(HEADS, self.net(x.to(self.device)))}

    def predict(self, images: list, batch_size: int = 256) -> list[dict[str, Any]]:
        """One dict per image: ``shape``, ``color``, ``fill`` (names) and ``shape_conf``, ``color_conf``,
        ``fill_conf`` (the winning class' probability)."""
        proba = self.predict_proba(images, batch_size)
        out: list[dict[str, Any]] = [{} for _ in range(len(images))]
        for h in HEADS:
            conf, idx = proba[h].max(-1)
            for i in range(len(images)):
                out[i][h] = self.classes[h][int(idx[i])]
                out[i][f"{h}_conf"] = float(conf[i])
        return out


def judge_config(widths: tuple[int, ...] = (24, 32, 64, 96, 128), image_size: int = 64) -> dict[str, Any]:
    """The architecture/class config stored with the judge weights."""
    return {
        "arch": "JudgeNet",
        "widths": list(widths),
        "image_size": image_size,
        "classes": {"shape": list(SHAPES), "color": list(COLORS), "fill": list(FILLS)},
    }


def load_judge(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Judge:
    """Load the shapes judge.

    Args:
        path (`str`, *optional*): weights file; defaults to the shipped ``models/shapes-judge.safetensors``.
        device (`str`, defaults to `"cpu"`): torch device.

    Returns:
        `Judge`: call ``.predict(list_of_pil_images)``.
    """
    from erasure.io import load_safetensors

    p = Path(path) if path is not None else default_judge_path()
    if not p.is_file():
        raise FileNotFoundError(f"judge weights not found: {p}; train them with `python -m erasure.shapes.train_judge`")
    tensors, meta = load_safetensors(p)
    if "config" not in meta:
        raise ValueError(f"{p} has no 'config' metadata; it is not a shapes judge file")
    config = json.loads(meta["config"])
    n_classes = tuple(len(config["classes"][h]) for h in HEADS)
    net = JudgeNet(tuple(config["widths"]), n_classes)  # type: ignore[arg-type]
    net.load_state_dict(tensors, strict=True)
    return Judge(net, config, device)
