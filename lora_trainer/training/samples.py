"""Preview pictures drawn with the model being trained, at the "Save Preview(s)" interval.

Each concept with "Number of Samples to Generate" above 0 gets that many
pictures of its "Sample Image Prompt" (blank: the prompt of its first
picture), with its sample negative prompt, CFG scale, steps and seed, saved
as `samples/<name>_<steps>_c<concept>_<n>.png` in the model folder.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import Concept
from ..data import Example
from ..fileio import atomic_path
from ..pipeline import draw_pictures, pipeline_from_parts
from .outputs import free_path
from .parts import WorkingModel

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def sample_prompts(concepts: list[Concept], instance: list[Example]) -> list[tuple[int, Concept, str]]:
    """(concept index, concept, prompt) of every concept that wants samples."""
    out = []
    for index, concept in enumerate(concepts):
        if not concept.is_set or concept.n_save_sample < 1:
            continue
        prompt = concept.save_sample_prompt.strip() or next(
            (e.prompt for e in instance if e.concept_index == index), concept.instance_prompt)
        out.append((index, concept, prompt))
    return out


@torch.no_grad()
def draw_samples(model: WorkingModel, unet, text_encoder, wanted: list[tuple[int, Concept, str]], *,
                 folder: Path, stem: str, resolution: int, device: torch.device, autocast, seed: int,
                 text_encoder_2=None) -> list[Path]:
    """Draw and save the samples; return their paths. `unet`/`text_encoder` (and SDXL's `text_encoder_2`)
    are the models being trained (unwrapped), `autocast` the training's autocast context factory."""
    if not wanted:
        return []
    # The VAE (Cache Latents) and the text encoders (Cache Text Encoder Outputs) may wait on the CPU.
    resting = [(m, next(m.parameters()).device) for m in (model.vae, text_encoder, text_encoder_2) if m is not None]
    for module, _ in resting:
        module.to(device)
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    pipe = pipeline_from_parts(unet=unet, vae=model.vae, text_encoder=text_encoder, tokenizer=model.tokenizer,
                               scheduler=model.noise_scheduler, text_encoder_2=text_encoder_2,
                               tokenizer_2=model.tokenizer_2)
    paths = []
    try:
        for index, concept, prompt in wanted:
            base_seed = concept.sample_seed if concept.sample_seed >= 0 else seed
            for n in range(concept.n_save_sample):
                generator = torch.Generator("cpu").manual_seed(base_seed + n)
                with autocast():
                    image = draw_pictures(pipe, prompt=prompt,
                                          negative_prompt=concept.save_sample_negative_prompt.strip() or None,
                                          num_inference_steps=concept.save_infer_steps,
                                          guidance_scale=concept.save_guidance_scale, height=resolution,
                                          width=resolution, generator=generator)[0]
                path = free_path(Path(folder) / SAMPLES_DIR / f"{stem}_c{index + 1}_{n}.png")
                with atomic_path(path, overwrite=False) as tmp:
                    image.save(tmp, format="PNG")
                paths.append(path)
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
        for module, where in resting:
            module.to(where)
    log.info("Saved %d sample pictures in %s", len(paths), Path(folder) / SAMPLES_DIR)
    return paths

