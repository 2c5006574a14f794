"""SDXL LoRA files: kohya's SDXL names and metadata, resolving to the original layout, merged, read by diffusers."""
from __future__ import annotations

import pytest
import torch

from helpers_lora import metadata_for, peft_backend_problem, randomize
from helpers_merge import make_model, text_output, unet_output
from lora_trainer.checkpoint import create_model, load_model_spec
from lora_trainer.checkpoint_io import CheckpointReader
from lora_trainer.config import ModelInfo
from lora_trainer.errors import ModelError
from lora_trainer.kohya import read_kohya_lora, resolve, target_table
from lora_trainer.lora import TEXT_TARGETS, UNET_TARGETS, inject_lora, lora_state_dict, save_lora
from lora_trainer.merge import merge_lora


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(models, model folder, source checkpoint) of a working model from the tiny SDXL checkpoint."""
    from lora_trainer.host import ModelsDir
    from lora_trainer.tiny_sdxl import write_tiny_xl_checkpoint

    root = tmp_path_factory.mktemp("lora-sdxl")
    checkpoint = write_tiny_xl_checkpoint(root / "ckpt")
    models = ModelsDir.at(root / "models")
    models.checkpoints.mkdir(parents=True)
    return models, make_model(models, checkpoint, "xl"), models.checkpoints / checkpoint.name


def load_xl(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (UNet2DConditionModel.from_pretrained(str(folder / "unet")).float().eval(),
            CLIPTextModel.from_pretrained(str(folder / "text_encoder")).float().eval(),
            CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2")).float().eval())


def unet_xl_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim,
                         generator=g)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0]])}
    with torch.no_grad():
        return unet(x, 500, ctx, added_cond_kwargs=added).sample


def trained_lora(folder, path):
    """Adapters injected as training injects them for SDXL, given random weights, saved as a file."""
    unet, te1, te2 = load_xl(folder)
    family = ModelInfo.load(folder / "model_info.json").family
    adapters = [inject_lora(unet, UNET_TARGETS, rank=4, alpha=2.0, prefix="lora_unet",
                            rename=lambda p: family.unet_lora_path(p, unet.config))]
    for te, model in zip(family.text_encoders, (te1, te2)):
        adapters.append(inject_lora(model, TEXT_TARGETS, rank=4, alpha=2.0, prefix=te.kohya_prefix))
    for i, adapter in enumerate(adapters):
        randomize(adapter, i)
    save_lora(path, lora_state_dict(*adapters), metadata_for(folder))
    return (unet, te1, te2), adapters


def test_names_and_metadata_are_kohyas_sdxl_ones_and_resolve_to_the_original_layout(xl, tmp_path):
    models, folder, source = xl
    _, (unet_lora, te1_lora, te2_lora) = trained_lora(folder, tmp_path / "xl.safetensors")
    assert unet_lora and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                           "lora_unet_output_blocks_")) for n in unet_lora)
    assert any("transformer_blocks_1_" in n for n in unet_lora)  # the depth-2 level is adapted too
    assert te1_lora and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in te1_lora)
    assert te2_lora and all(n.startswith("lora_te2_text_model_encoder_layers_") for n in te2_lora)
    lora = read_kohya_lora(tmp_path / "xl.safetensors")
    meta = lora.metadata
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert lora.family() == "sdxl"
    targets = resolve(lora, target_table(load_model_spec(folder)), family="sdxl", where="the tiny SDXL model")
    assert {t.part for t in targets.values()} == {"unet", "text_encoder", "text_encoder_2"}
    with CheckpointReader(source) as reader:
        for name, target in targets.items():
            shape = reader.get_slice_shape(target.original_key)
            rows = target.rows or (0, shape[0])
            assert (rows[1] - rows[0], *shape[1:]) == target.shape, name
        # The web UI adapts OpenCLIP's fused in_proj by rows: q, k, v of one block share its key.
        fused = [t for n, t in targets.items() if n.startswith("lora_te2_") and "self_attn_q_proj" in n]
        assert fused and all(t.original_key.endswith("attn.in_proj_weight") and t.rows[0] == 0 for t in fused)


def test_merge_equals_applying_the_lora_and_another_family_is_refused(xl, tmp_path, tiny_sd1):
    models, folder, _ = xl
    (unet, te1, te2), _ = trained_lora(folder, tmp_path / "xl.safetensors")
    base_unet, base_te1, base_te2 = load_xl(folder)
    merged = merge_lora(models, "xl", lora=str(tmp_path / "xl.safetensors"), custom_name="xl-merged")
    back = models.checkpoints.parent / "back"
    from lora_trainer.host import ModelsDir

    again = ModelsDir.at(back)
    again.checkpoints.mkdir(parents=True)
    m_unet, m_te1, m_te2 = load_xl(create_model(again, str(merged), "again"))
    for have, want, was in ((unet_xl_output(m_unet), unet_xl_output(unet), unet_xl_output(base_unet)),
                            (text_output(m_te1), text_output(te1), text_output(base_te1)),
                            (text_output(m_te2), text_output(te2), text_output(base_te2))):
        assert (want - was).abs().max() > 1e-3
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
    # A LoRA of an SD 1.x model is refused by family.
    sd1_dir = make_model(models, tiny_sd1, "one")
    from helpers_lora import inject_both

    from helpers_merge import load_parts
    u, t = load_parts(sd1_dir)
    a, b = inject_both(u, t)
    randomize(a, 1)
    save_lora(tmp_path / "sd1.safetensors", lora_state_dict(a, b), metadata_for(sd1_dir))
    with pytest.raises(ModelError, match="this LoRA is for SD 1.x, the model 'xl' is SDXL"):
        merge_lora(models, "xl", lora=str(tmp_path / "sd1.safetensors"), custom_name="refused")


def test_diffusers_sdxl_load_lora_weights_reads_the_file_the_same(xl, tmp_path):
    reason = peft_backend_problem()
    if reason:
        pytest.skip(reason)
    from diffusers import StableDiffusionXLPipeline

    models, folder, _ = xl
    (unet, te1, te2), _ = trained_lora(folder, tmp_path / "xl.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    base = unet_xl_output(pipe.unet), text_output(pipe.text_encoder), text_output(pipe.text_encoder_2)
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors")
    got = unet_xl_output(pipe.unet), text_output(pipe.text_encoder), text_output(pipe.text_encoder_2)
    for have, want, was in zip(got, (unet_xl_output(unet), text_output(te1), text_output(te2)), base):
        assert (want - was).abs().max() > 1e-3
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)
