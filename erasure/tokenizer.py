"""Offline construction of the CLIP BPE tokenizer that Stable Diffusion uses.

open_clip_torch ships ``bpe_simple_vocab_16e6.txt.gz``, the same byte-pair vocabulary as
``openai/clip-vit-large-patch14``. From it we write ``vocab.json`` and ``merges.txt`` and build a
``transformers.CLIPTokenizer`` identical to SD's (vocab 49408, bos 49406, eos/pad 49407, 77 tokens).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

__all__ = ["bpe_vocab_path", "write_clip_tokenizer_files", "build_clip_tokenizer"]

MODEL_MAX_LENGTH = 77


def bpe_vocab_path() -> Path:
    """Return the path of open_clip's shipped BPE vocabulary file."""
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - dependency of the package
        raise ImportError("open_clip_torch is required to build the CLIP tokenizer offline") from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"open_clip does not ship {path.name}; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``.

    The result is a folder that ``CLIPTokenizer.from_pretrained`` loads, as in an SD pipeline's
    ``tokenizer/`` subfolder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_vocab_path()) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408, len(encoder)
    (out / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = dict(special, model_max_length=MODEL_MAX_LENGTH, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_clip_tokenizer(out_dir: str | os.PathLike | None = None):
    """Build SD's CLIP tokenizer offline. Files go to ``out_dir`` (a temporary folder if omitted)."""
    from transformers import CLIPTokenizer

    if out_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            write_clip_tokenizer_files(tmp)
            return CLIPTokenizer.from_pretrained(tmp)
    write_clip_tokenizer_files(out_dir)
    return CLIPTokenizer.from_pretrained(str(out_dir))
