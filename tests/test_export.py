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
