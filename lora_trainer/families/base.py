"""What every model family provides: the small interface the rest of the core asks.

A family (SD 1.x, SD 2.x, SDXL, ...) owns everything that differs between
architectures: the prefixes of its original (ldm/sgm) layout, how it is
recognised from the weights or from an original yaml, the yaml shipped for
it, its text encoders (where they live in the original layout and how they
are named in kohya LoRA files), the metadata names other tools file it under
(`ss_base_model_version`, `modelspec.architecture`) and the diffusers pipeline
that draws with it. The core never tests a family's name; it asks the family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass
class ModelSpec:
    """Everything needed to convert a checkpoint and to write it back."""

    model_type: str                 # one of a family's model_types (or its provisional type before settling)
    prediction_type: str            # epsilon | v_prediction
    resolution: int                 # native picture size in pixels
    unet: dict                      # UNet2DConditionModel config
    vae: dict                       # AutoencoderKL config
    scheduler: dict                 # DDPM-family scheduler config
    original_config: str            # the original-layout yaml text
    text: dict = field(default_factory=dict)    # CLIPTextConfig kwargs of the first text encoder, from the weights
    text_2: dict = field(default_factory=dict)  # ... of the second one (SDXL), from the weights

    @property
    def family(self) -> "Family":
        from . import family_of

        return family_of(self.model_type)

    def text_config(self, part: str) -> dict:
        """The CLIPTextConfig kwargs of the text-encoder part `part` ("text_encoder" or "text_encoder_2")."""
        return self.text_2 if part == "text_encoder_2" else self.text


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: where it lives in the original layout and how LoRA files name it."""

    part: str                  # folder of the diffusers model: "text_encoder" | "text_encoder_2"
    prefix: str                # original-layout prefix of its weights
    kind: str                  # "clip": transformers names under `prefix`; "openclip": OpenCLIP names, fused in_proj
    kohya_prefix: str          # what kohya (and this project) write: "lora_te", "lora_te1", "lora_te2"
    kohya_aliases: tuple[str, ...] = ()   # other prefixes tools write for the same encoder
    webui_strip: str = ""      # the web UI names original-layout modules after `prefix` minus this
    drop_last_layer: bool = False  # SD 2.x conditions on the penultimate block: the last one is not converted
    with_projection: bool = False  # diffusers model is CLIPTextModelWithProjection (SDXL's pooled embedding)
    pad_token: str = "<|endoftext|>"
    tokenizer: str = "tokenizer"   # folder of its tokenizer in the diffusers model


class Family:
    """The interface; one subclass per family, one instance of each in `families.FAMILIES`."""

    name: str = ""                          # "sd1"
    title: str = ""                         # "SD 1.x", for messages
    model_types: tuple[str, ...] = ()       # what ModelInfo.model_type may be for this family
    provisional: str | None = None          # model_type before `settle` decides (e.g. "sd2?")
    text_encoders: tuple[TextEncoder, ...] = ()
    context_width: int = 0                  # width of the text the UNet attends to in the released models
    lora_versions: tuple[str, ...] = ()     # `ss_base_model_version` prefixes of its LoRAs
    modelspec_prefix: str = ""              # `modelspec.architecture` prefix of its files
    pipeline_class: str = "StableDiffusionPipeline"
    # model_index.json entries of the pipeline besides its parts and scheduler
    pipeline_extras: dict = {"feature_extractor": [None, None], "safety_checker": [None, None],
                             "requires_safety_checker": False}
    configs: dict[str, str] = {}            # model_type -> shipped yaml file name in lora_trainer/configs
    trainable: bool = True                  # whether training knows this family's conditioning
    full_finetune: bool = True              # whether "Use LORA" off (writing the weights back) is supported
    time_ids: bool = False                  # whether the UNet takes SDXL's size/crop ids (each picture's own)
    vae_fp16_safe: bool = True              # False: encode latents in fp32 (the VAE overflows in fp16)
    training_defaults: dict = {}            # TrainingParams values that suit the family (for the UI to offer)

    @property
    def parts(self) -> tuple[str, ...]:
        """The diffusers parts of a working model, in conversion order."""
        return ("unet", "vae", *(te.part for te in self.text_encoders))

    def check_params(self, params) -> None:
        """Refuse, before anything is loaded, the TrainingParams this family cannot train with.

        The options shared by every family are checked elsewhere (train.check_before_loading);
        docs/families.md goes through every option for SDXL.
        Raises ConfigError naming the option and the fix.
        """
        from ..errors import ConfigError

        if not params.use_lora and not self.full_finetune:
            raise ConfigError(f"Use LORA ('use_lora'): a full fine-tune of {self.title} models is not supported; "
                              "tick Use LORA")

    def text_encoder(self, part: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.part == part:
                return te
        raise KeyError(f"{self.title} has no {part}")

    def claims(self, keys: set[str]) -> bool:
        """Whether the weights' names are this family's original layout."""
        raise NotImplementedError

    def detect(self, reader) -> str:
        """The model_type (or `provisional`) of a checkpoint this family claims.

        Raises CheckpointError naming a variant that is not supported (inpainting, refiner, ...).
        """
        raise NotImplementedError

    def claims_config(self, root: dict) -> bool:
        """Whether an original yaml (parsed) describes this family."""
        raise NotImplementedError

    def spec_from_config(self, root: dict, text: str, source: str) -> ModelSpec:
        """The ModelSpec of an original yaml; raises CheckpointError naming `source` for a missing entry."""
        raise NotImplementedError

    def shipped_config(self, model_type: str) -> str:
        return resources.files("lora_trainer.configs").joinpath(self.configs[model_type]).read_text()

    def settle(self, spec: ModelSpec, unet) -> None:
        """Decide what only the loaded UNet tells (SD 2.x: 512 epsilon or 768 v). Default: nothing."""

    def yaml_needed(self, model_type: str, text: str) -> bool:
        """Whether a merged checkpoint needs its yaml beside it for the web UI to load it right."""
        return text != self.shipped_config(model_type)

    def base_model_version(self, model_type: str) -> str:
        """The `ss_base_model_version` kohya writes for a LoRA of this model type."""
        raise NotImplementedError

    @property
    def ss_v2(self) -> bool:
        """kohya's `ss_v2`: the web UI files a LoRA with "True" under SD2."""
        return False

    def modelspec_architecture(self, model_type: str) -> str:
        """`modelspec.architecture` of a checkpoint of this model type (a LoRA adds "/lora")."""
        raise NotImplementedError

    def encode_text(self, encoders: list, batch: dict, device) -> tuple:
        """(hidden states the UNet attends to, pooled embedding or None) of a batch's token ids.

        `encoders` are the text encoders in `text_encoders` order; `batch` holds
        "input_ids" (and "input_ids_2" where the family has a second tokenizer).
        """
        return encoders[0](batch["input_ids"].to(device))[0], None

    def added_conditioning(self, pooled, batch: dict, device, dtype) -> dict | None:
        """The UNet's `added_cond_kwargs` (SDXL: pooled embedding and time ids); None when it takes none."""
        return None

    def condition(self, encoders: list, batch: dict, device) -> tuple:
        """The UNet's conditioning of a batch: (encoder hidden states, added_cond_kwargs or None)."""
        hidden, pooled = self.encode_text(encoders, batch, device)
        return hidden, self.added_conditioning(pooled, batch, device, hidden.dtype)

    def unet_lora_path(self, path: str, unet_config) -> str:
        """The module path a kohya LoRA names a UNet module by (before '.' -> '_'): kohya's SD 1.x/2.x
        scripts use the diffusers path."""
        return path
