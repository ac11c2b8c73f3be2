"""`erasure export`: diffusers folder and single-file (LDM layout) checkpoints that diffusers loads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from erasure import ConceptSpec, EraseConfig, erase, generate, load_erased_pipeline
from erasure.cli import main as cli_main
from erasure.export import unet_to_ldm, vae_to_ldm


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = EraseConfig(
        model=str(tiny_model_dir), concepts=[ConceptSpec(name="c", forget_prompts=["a red circle"],
                                                         anchor_prompts=["a red square"], retain_prompts=["a star"])],
        steps=2, batch_size=2, forget_images_per_prompt=2, retain_images_per_prompt=1, data_steps=2, lr=1e-3,
        cache_dir=str(tmp / "cache"), device="cpu",
    )
    return erase(cfg, tmp / "run")


def test_export_folder_and_single_file_reload(run_dir, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    rc = cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "folder"),
                   "--single-file", str(tmp_path / "model.safetensors")])
    assert rc == 0
    erased = load_erased_pipeline(run_dir, device="cpu")
    ref = np.asarray(generate(erased, "a red circle", 3, steps=2)[0])
    folder = StableDiffusionPipeline.from_pretrained(str(tmp_path / "folder"))
    single = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(tiny_model_dir), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )
    for pipe in (folder, single):
        for comp in ("unet", "vae", "text_encoder"):
            a, b = getattr(erased, comp).state_dict(), getattr(pipe, comp).state_dict()
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k].reshape(-1), b[k].reshape(-1)) for k in a), comp
        pipe.set_progress_bar_config(disable=True)
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(erased.scheduler.config)
        assert np.array_equal(np.asarray(generate(pipe, "a red circle", 3, steps=2)[0]), ref)
    # refuses to overwrite
    assert cli_main(["export", "--run", str(run_dir), "--out", str(tmp_path / "folder")]) == 2


def test_sd14_layout_matches_diffusers_converter():
    """At SD v1.4's architecture our names invert diffusers' LDM -> diffusers conversion exactly."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from erasure.diffusion.tiny import SD14_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
        )
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    assert CHECKPOINT_KEY_NAMES["v1"] in ldm
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(back[k].shape == v.shape for k, v in unet.state_dict().items())
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    back_vae = convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    assert set(back_vae) == set(vae.state_dict())
    assert all(back_vae[k].shape == v.shape for k, v in vae.state_dict().items())


def _tiny_sdxl_distinct_encoders(out_dir):
    """bb's tiny SDXL has two 16-wide CLIPs; diffusers' single-file loader tells SDXL's encoders apart by width
    (768 vs 1280), so this variant gives the second one 24."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from erasure.backbones.tiny import _clip, _vae
    from erasure.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 24,
        cross_attention_dim=16 + 24, norm_num_groups=4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(4), text_encoder=_clip(16), text_encoder_2=_clip(24, 24, seed=1),
        tokenizer=build_clip_tokenizer(out_dir / "tokenizer"), tokenizer_2=build_clip_tokenizer(out_dir / "tokenizer_2"),
        unet=unet, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return pipe


def test_sdxl_single_file_round_trip(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    from erasure.export import save_single_file

    pipe = _tiny_sdxl_distinct_encoders(tmp_path / "sdxl")
    with torch.no_grad():  # an "erased" UNet: the file must carry changed weights, not the folder's
        pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(1.5)
    path = save_single_file(pipe, tmp_path / "sdxl.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
    for k in ("clip_sdxl", "open_clip_sdxl"):
        assert CHECKPOINT_KEY_NAMES[k] in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "sdxl"), local_files_only=True)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, comp).state_dict(), getattr(back, comp).state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        assert set(a) <= set(b), comp
        assert all(torch.equal(a[k].reshape(-1), b[k].reshape(-1)) for k in a), comp

    def image(p):
        p.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        p.set_progress_bar_config(disable=True)
        return p("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=64,
                 width=64, output_type="np").images

    np.testing.assert_array_equal(image(back), image(pipe))


def test_sdxl_unet_layout_matches_diffusers_converter():
    """At SDXL base's architecture our UNet names invert diffusers' LDM -> diffusers conversion exactly."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
               use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(back[k].shape == v.shape for k, v in unet.state_dict().items())
