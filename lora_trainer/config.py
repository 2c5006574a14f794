"""The single source of truth for everything the user can set or see.

Three dataclasses: `ModelInfo` (what "Create Model" records and training
updates), `Concept` (one entry of the "Concepts" tab) and `TrainingParams`
(the "Parameters" tab). Each field carries its UI label and help text in its
metadata, so the gradio tabs and the command line are built from the same
place and cannot drift apart. All three are saved as JSON in the model folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .families import all_model_types, family_of
from .fileio import atomic_write_text

MODEL_INFO_FILE = "model_info.json"
PARAMS_FILE = "params.json"
CONCEPTS_FILE = "concepts_list.json"


def param(default: Any, label: str, help: str, *, choices: tuple | None = None,
          minimum: float | None = None, maximum: float | None = None,
          advanced: bool = False, cli: str | None = None) -> Any:
    """A dataclass field with the metadata the UI and the CLI are built from.

    `cli` is the command-line flag when it differs from `--<field name>`.
    """
    meta = {"label": label, "help": help, "choices": choices, "minimum": minimum,
            "maximum": maximum, "advanced": advanced, "cli": cli}
    return field(default=default, metadata=meta)


def field_meta(cls_or_obj, name: str) -> dict:
    """Label, help and limits of one field (see `param`)."""
    return {f.name: f for f in dataclasses.fields(cls_or_obj)}[name].metadata


class JsonConfig:
    """Mixin: JSON round trip that ignores unknown keys and names bad ones."""

    ALIASES: dict[str, str] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "settings"):
        """Build from a dict; keys of other tools are mapped through `ALIASES`.

        Raises ConfigError naming `source` when a value has the wrong type.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            key = cls.ALIASES.get(key, key)
            if key in names and key not in kwargs:
                kwargs[key] = _coerce(value, names[key], cls, source)
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Raises ConfigError when the file is missing or is not valid JSON."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
        return cls.from_dict(data, source=str(path))


def _coerce(value: Any, f: dataclasses.Field, cls, source: str) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else None
    if value is None or default is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{f.name}' must be a {type(default).__name__}, got {value!r}") from None
    return value


def check_range(obj, name: str) -> None:
    """Raise ConfigError when a numeric field is outside its declared limits."""
    meta = field_meta(obj, name)
    value = getattr(obj, name)
    label = meta["label"]
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{label} ('{name}') must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{label} ('{name}') must be at least {meta['minimum']}; got {value!r}")
    if meta["maximum"] is not None and value > meta["maximum"]:
        raise ConfigError(f"{label} ('{name}') must be at most {meta['maximum']}; got {value!r}")


def check_all_ranges(obj) -> None:
    for f in dataclasses.fields(obj):
        check_range(obj, f.name)


MODEL_TYPES = all_model_types()
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class ModelInfo(JsonConfig):
    """What "Create Model" records about a working model; training updates it."""

    model_name: str = param("", "Loaded Model", "Name of the working model (its folder under lora_trainer/).")
    source_checkpoint: str = param("", "Source Checkpoint", "File name of the checkpoint the model was created from.")
    source_checkpoint_hash: str = param("", "Source Checkpoint Hash", "SHA-256 of the source checkpoint file (the web UI shows its first 10 characters); blank until a job first needs it, unless it was known at Create Model.")
    source_checkpoint_size: int = param(0, "Source Checkpoint Size", "Size in bytes of the source checkpoint at Create Model: its hash is computed later only from the same file.", minimum=0)
    source_checkpoint_mtime_ns: int = param(0, "Source Checkpoint Time", "Modification time (ns) of the source checkpoint at Create Model, for the same check.", minimum=0)
    model_type: str = param("sd1", "Model Type", "Architecture family: sd1, sd2 (512, epsilon), sd2-v (768, v-prediction) or sdxl (SDXL 1.0 base and its fine-tunes).", choices=MODEL_TYPES)
    prediction_type: str = param("epsilon", "Prediction Type", "What the UNet predicts: the noise (epsilon) or the velocity (v_prediction).", choices=PREDICTION_TYPES)
    resolution: int = param(512, "Resolution", "Native picture size of the model in pixels.", minimum=8)
    revision: int = param(0, "Model Revision", "Goes up by one with every training run.", minimum=0)
    lifetime_steps: int = param(0, "Lifetime Steps", "Training steps taken over all runs.", minimum=0)
    lifetime_epochs: int = param(0, "Lifetime Epochs", "Epochs taken over all runs.", minimum=0)
    extracted_ema: bool = param(False, "Extract EMA Weights", "Whether the UNet came from the source's EMA weights.")
    latest_lora: str = param("", "Lora Model", "File name of the newest LoRA written for this model (in the Lora folder).")

    def __post_init__(self):
        check_all_ranges(self)

    @property
    def family(self):
        """The model's family (`lora_trainer.families`)."""
        return family_of(self.model_type)

    def default_params(self) -> "TrainingParams":
        """The Parameters a model starts with before any are saved: the defaults at its native
        resolution, with what its family needs (SDXL: aspect-ratio buckets)."""
        return TrainingParams(**{**self.family.training_defaults, "resolution": self.resolution})

    @property
    def v2(self) -> bool:
        """kohya's `ss_v2` of the model's family."""
        return self.family.ss_v2

    @property
    def base_model_version(self) -> str:
        """The `ss_base_model_version` the web UI files a LoRA under."""
        return self.family.base_model_version(self.model_type)


@dataclass
class Concept(JsonConfig):
    """One subject to teach: its pictures, prompts and class (regularisation) pictures."""

    # Keys of the dreambooth extension's concepts_list.json that mean the same thing.
    ALIASES = {"num_class_images_per": "num_class_images_per_image", "class_images": "num_class_images"}

    instance_data_dir: str = param("", "Dataset Directory", "Folder with the pictures of the subject to teach.")
    class_data_dir: str = param("", "Classification Dataset Directory", "Folder with class (regularisation) pictures; missing ones are generated. Blank: the model folder's classifiers_<n>.")
    instance_prompt: str = param("", "Instance Prompt", "Prompt for the subject's pictures, a rare token plus the class, e.g. 'chibi scs girl'. [filewords] is replaced by each picture's caption.")
    class_prompt: str = param("", "Class Prompt", "Prompt for the class pictures, e.g. 'chibi girl'. [filewords] is replaced by each picture's caption.")
    instance_token: str = param("", "Instance Token", "The rare token of the subject (e.g. 'scs'); used with [filewords] to put it into captions that lack it.", advanced=True)
    class_token: str = param("", "Class Token", "The class word (e.g. 'girl'); used with [filewords] to build class captions.", advanced=True)
    num_class_images: int = param(0, "Total Number of Class/Reg Images", "How many class pictures to use; about 10 times the subject's pictures is advised. 0 turns prior preservation off.", minimum=0)
    num_class_images_per_image: int = param(0, "Class Images Per Instance Image", "Alternative to the total: this many class pictures for each subject picture (the dreambooth extension's 'num_class_images_per'). 0: use the total.", minimum=0, advanced=True)
    class_negative_prompt: str = param("", "Classification Image Negative Prompt", "Negative prompt used when generating class pictures.", advanced=True)
    class_guidance_scale: float = param(7.5, "Class Images Guidance Scale", "CFG scale used when generating class pictures.", minimum=0.0, maximum=50.0, advanced=True)
    class_infer_steps: int = param(20, "Class Images Generation Steps", "Sampling steps used when generating class pictures.", minimum=1, maximum=150, advanced=True)
    validation_data_dir: str = param("", "Validation Directory", "Folder of pictures (with captions, as the Dataset Directory) whose loss is measured but never trained on; blank: Validation Share of this concept's pictures, if set.", advanced=True)
    save_sample_prompt: str = param("", "Sample Image Prompt", "Prompt for preview pictures during training. Blank: the instance prompt.")
    save_sample_negative_prompt: str = param("", "Sample Negative Prompt", "Negative prompt for preview pictures.", advanced=True)
    n_save_sample: int = param(1, "Number of Samples to Generate", "Preview pictures drawn at each preview interval.", minimum=0, maximum=16, advanced=True)
    save_guidance_scale: float = param(7.5, "Sample CFG Scale", "CFG scale of the preview pictures.", minimum=0.0, maximum=50.0, advanced=True)
    save_infer_steps: int = param(20, "Sample Steps", "Sampling steps of the preview pictures.", minimum=1, maximum=150, advanced=True)
    sample_seed: int = param(-1, "Sample Seed", "Seed of the preview pictures; -1 picks one.", advanced=True)

    def __post_init__(self):
        check_all_ranges(self)

    @property
    def is_set(self) -> bool:
        """A concept counts when it names a dataset folder (empty UI slots do not)."""
        return bool(self.instance_data_dir.strip())

    @property
    def with_prior_preservation(self) -> bool:
        return self.num_class_images > 0 or self.num_class_images_per_image > 0


def load_concepts(path: str | os.PathLike) -> list[Concept]:
    """Read a concepts JSON: a list of concept objects (ours or the dreambooth extension's).

    Raises ConfigError naming the file when it is not a list of objects.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: concepts file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "concepts" in data:
        data = data["concepts"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of concepts")
    return [Concept.from_dict(item, source=f"{path} concept {i + 1}") for i, item in enumerate(data)]


def save_concepts(concepts: list[Concept], path: str | os.PathLike) -> None:
    atomic_write_text(Path(path), json.dumps([c.to_dict() for c in concepts], indent=2) + "\n")


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("default", "xformers", "flash_attention")
OPTIMIZERS = ("AdamW", "Prodigy")
BASE_WEIGHTS = ("default", "fp8")


# Fields of the second text encoder (SDXL's): used, and shown in the tab, only for families with two.
SECOND_TEXT_ENCODER_FIELDS = ("text_encoder_2_rank", "text_encoder_2_alpha", "text_encoder_2_learning_rate")


@dataclass
class TrainingParams(JsonConfig):
    """The "Parameters" tab. Field names follow diffusers' train_dreambooth_lora.py where the meaning is the same."""

    # Keys of the dreambooth extension's db_config.json that mean the same thing.
    ALIASES = {"lora_unet_rank": "rank", "lora_txt_rank": "text_encoder_rank",
               "lora_learning_rate": "unet_learning_rate", "lora_txt_learning_rate": "text_encoder_learning_rate"}

    use_lora: bool = param(True, "Use LORA", "Train low-rank adapters (small file, fits 8 GB). Off: a full DreamBooth fine-tune of the UNet (and the text encoder if chosen).")
    rank: int = param(4, "Lora UNET Rank", "Rank of the UNet adapters: higher learns more detail and makes a larger file.", minimum=1, maximum=256)
    lora_alpha: float = param(4.0, "Lora UNET Alpha", "Scale of the UNet adapters is alpha / rank; alpha = rank means scale 1.", minimum=0.0, advanced=True)
    text_encoder_rank: int = param(4, "Lora Text Encoder Rank", "Rank of the text-encoder adapters (SDXL: of the first text encoder, CLIP ViT-L).", minimum=1, maximum=256)
    text_encoder_2_rank: int = param(0, "Lora Text Encoder 2 Rank", "SDXL only: rank of the adapters on the second text encoder (OpenCLIP ViT-bigG, about five times the size of the first); 0 = the Lora Text Encoder Rank. Models with one text encoder ignore it.", minimum=0, maximum=256)
    text_encoder_alpha: float = param(4.0, "Lora Text Encoder Alpha", "Scale of the text-encoder adapters is alpha / rank (SDXL: of the first text encoder).", minimum=0.0, advanced=True)
    text_encoder_2_alpha: float = param(0.0, "Lora Text Encoder 2 Alpha", "SDXL only: scale of the second text encoder's adapters is alpha / its rank; 0 = the Lora Text Encoder Alpha. Models with one text encoder ignore it.", minimum=0.0, advanced=True)
    conv_rank: int = param(0, "LoCon Conv Rank", "LoCon: also adapt the UNet's ResNet, downsampler and upsampler convolutions, the 3x3 ones with this rank (kohya's conv_dim; 4 to 16 is usual). Learns texture and style better; a larger file. 0 = off (attention layers only).", minimum=0, maximum=256, advanced=True)
    conv_alpha: float = param(1.0, "LoCon Conv Alpha", "Scale of the 3x3 convolution adapters is alpha / conv rank (kohya's conv_alpha).", minimum=0.0, advanced=True)
    use_dora: bool = param(False, "Use DoRA", "DoRA (weight-decomposed LoRA): each adapted layer also learns a magnitude per input column, saved as dora_scale; often closer to a full fine-tune at the same rank, a little slower. The web UI 1.10's Lora applies it.", advanced=True)
    num_train_epochs: int = param(100, "Training Steps Per Image (Epochs)", "How many times each picture is seen; steps = epochs x pictures / batch size.", minimum=1)
    max_train_steps: int = param(0, "Max Training Steps", "Stop after this many steps; 0 = no limit besides the epochs.", minimum=0)
    train_batch_size: int = param(1, "Batch Size", "Pictures per step. Prior preservation doubles what one step holds.", minimum=1, maximum=64)
    gradient_accumulation_steps: int = param(1, "Gradient Accumulation Steps", "Steps whose gradients add up before one update: a larger effective batch at no memory cost.", minimum=1, maximum=128, advanced=True)
    learning_rate: float = param(2e-6, "Learning Rate", "Learning rate of a full fine-tune (Use LORA off).", minimum=0.0, maximum=1.0)
    unet_learning_rate: float = param(1e-4, "Lora UNET Learning Rate", "Learning rate of the UNet adapters.", minimum=0.0, maximum=1.0)
    text_encoder_learning_rate: float = param(5e-5, "Lora Text Encoder Learning Rate", "Learning rate of the text-encoder adapters (SDXL: of the first text encoder).", minimum=0.0, maximum=1.0)
    text_encoder_2_learning_rate: float = param(0.0, "Lora Text Encoder 2 Learning Rate", "SDXL only: learning rate of the second text encoder's adapters (OpenCLIP ViT-bigG); 0 = the Lora Text Encoder Learning Rate. Models with one text encoder ignore it.", minimum=0.0, maximum=1.0)
    lr_scheduler: str = param("constant", "Learning Rate Scheduler", "How the learning rate changes over the run.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = param(0, "Learning Rate Warmup Steps", "Steps over which the learning rate ramps up from 0.", minimum=0, advanced=True)
    lr_num_cycles: int = param(1, "Number of Hard Resets", "Restarts of 'cosine_with_restarts'.", minimum=1, advanced=True)
    lr_power: float = param(1.0, "Polynomial Power", "Power of the 'polynomial' scheduler.", minimum=0.0, advanced=True)
    resolution: int = param(512, "Max Resolution", "Training picture size in pixels (multiple of 8); pictures of any size are resized to it (with Aspect Ratio Bucketing: to a shape of at most as many pixels). SDXL needs 1024, its native size (a new SDXL model starts there); smaller loses detail.", minimum=8, maximum=2048)
    center_crop: bool = param(False, "Center Crop", "Cut non-square pictures to a square in the middle. Off: resize the whole picture and pad.")
    hflip: bool = param(True, "Apply Horizontal Flip", "Randomly mirror pictures: twice the variety for subjects that look the same mirrored.")
    use_buckets: bool = param(False, "Aspect Ratio Bucketing", "Group pictures by aspect ratio and train each at its own shape (at most Max Resolution x Max Resolution pixels) instead of cropping. SDXL needs it (on for a new SDXL model): it was trained on such buckets, and the picture's real size and crop go into its conditioning.")
    mixed_precision: str = param("no", "Mixed Precision", "fp16 or bf16 halve memory on the GPU; xformers needs one of them.", choices=MIXED_PRECISION)
    base_weights: str = param("default", "Base Weight Storage", "How the frozen UNet and text-encoder weights are kept: default = the Mixed Precision dtype; fp8 = float8 e4m3 with a scale per tensor, cast to the compute dtype one layer at a time: half the memory of fp16 weights (needs Use LORA and torch >= 2.1).", choices=BASE_WEIGHTS)
    attention: str = param("default", "Memory Attention", "flash_attention = PyTorch's scaled_dot_product_attention; xformers needs the xformers package and fp16/bf16.", choices=ATTENTION)
    use_8bit_adam: bool = param(False, "Use 8bit Adam", "AdamW with 8-bit state from bitsandbytes: saves optimizer memory (NVIDIA GPUs; the CPU with bitsandbytes >= 0.50).")
    optimizer: str = param("AdamW", "Optimizer", "AdamW (8-bit with Use 8bit Adam), or Prodigy: learning-rate free (the prodigyopt package), it finds the step size itself; set the learning rates to 1.0 with it (the 'Adaptive' preset does).", choices=OPTIMIZERS)
    weight_decay: float = param(1e-2, "Weight Decay", "Decoupled weight decay of the optimizer (AdamW's and Prodigy's).", minimum=0.0, maximum=1.0, advanced=True)
    prodigy_d_coef: float = param(1.0, "Prodigy D Coefficient", "Prodigy: multiplies the step size it estimates; below 1 (e.g. 0.5) when it learns too fast, above when too slow.", minimum=0.0, maximum=100.0, advanced=True)
    prodigy_safeguard_warmup: bool = param(False, "Prodigy Safeguard Warmup", "Prodigy: keep the step-size estimate from growing too fast during Learning Rate Warmup; recommended by its authors for diffusion models.", advanced=True)
    prodigy_use_bias_correction: bool = param(False, "Prodigy Bias Correction", "Prodigy: Adam's bias correction in the step size; recommended by its authors for diffusion models.", advanced=True)
    gradient_checkpointing: bool = param(False, "Gradient Checkpointing", "Recompute activations in the backward pass: much less memory, about 20% slower.")
    train_text_encoder: bool = param(True, "Train Text Encoder", "Also adapt the text encoder: better likeness, more memory. Untick if out of memory.")
    prior_loss_weight: float = param(1.0, "Prior Loss Weight", "Weight of the class pictures' loss in prior preservation.", minimum=0.0)
    cache_latents: bool = param(True, "Cache Latents", "Encode every picture once and move the VAE off the GPU (flip is cached too).")
    cache_text_encoder_outputs: bool = param(False, "Cache Text Encoder Outputs", "Encode every prompt once before the first step and move the text encoders off the GPU (SDXL's two hold about 1.6 GB in fp16: the 8 GB GPU (SDXL) preset needs it on). Needs Train Text Encoder off, and no Shuffle Caption or caption dropout.")
    compile_unet: bool = param(False, "Compile UNet (fast path)", "Run the UNet's training step through torch.compile, the LoRA adapters inside the compiled graph, and on a CUDA GPU with Aspect Ratio Bucketing off also as CUDA graphs: faster steps after a first one that compiles for a minute or more (again for each new picture shape), the same loss within rounding. Needs torch >= 2 and a C++ compiler (g++, or Visual Studio's cl on Windows) on the CPU, triton on a GPU; if compiling fails the run goes on without it. Previews and validation stay uncompiled.", advanced=True)
    snr_gamma: float = param(0.0, "Min SNR Gamma", "Min-SNR loss weighting (5 is common); 0 = off.", minimum=0.0, advanced=True)
    noise_offset: float = param(0.0, "Noise Offset", "Adds a per-channel offset to the noise, helping very dark or bright pictures (0.05 to 0.1); 0 = off.", minimum=0.0, maximum=1.0, advanced=True)
    validation_split: float = param(0.0, "Validation Share", "Share of each concept's pictures held out from training to measure the validation loss on (0.1 = one in ten; a concept with a Validation Directory uses that instead); 0 = none.", minimum=0.0, maximum=0.5, advanced=True)
    validation_every_n_steps: int = param(0, "Validation Frequency (Step)", "Measure the validation loss every N steps (and at every save and the end); 0 = only at saves and the end.", minimum=0, advanced=True)
    use_ema: bool = param(False, "Use EMA", "Keep an exponential moving average of the trained weights and save and sample with it: smoother results, one more copy of the trained weights in memory.", advanced=True)
    ema_decay: float = param(0.999, "EMA Decay", "How slowly the average follows the weights at each step: 0.999 averages over about the last 1000 steps.", minimum=0.0, maximum=1.0, advanced=True)
    masked_loss: bool = param(False, "Masked Loss", "Weight the loss by a mask beside each picture (<name>.mask.png: white trains, black is ignored) or the picture's transparency; pictures without one train whole.", advanced=True)
    shuffle_caption: bool = param(False, "Shuffle Caption", "[filewords] captions only: put the comma-separated tags after the first Keep Tokens in a new random order every epoch.", advanced=True)
    keep_tokens: int = param(0, "Keep Tokens", "[filewords] captions: this many leading tags (e.g. the instance token and class) are never shuffled or dropped.", minimum=0, advanced=True)
    caption_tag_dropout_rate: float = param(0.0, "Caption Tag Dropout Rate", "[filewords] captions: chance that each tag after the Keep Tokens is left out of a step's caption; 0 = off.", minimum=0.0, maximum=1.0, advanced=True)
    caption_dropout_rate: float = param(0.0, "Caption Dropout Rate", "[filewords] captions: chance that a picture is trained with an empty caption (unconditional); 0 = off.", minimum=0.0, maximum=1.0, advanced=True)
    seed: int = param(-1, "Seed", "Random seed of the run; -1 picks one.")
    save_every_n_steps: int = param(0, "Save Model Frequency (Step)", "Write the LoRA every N steps as well as at the end; 0 = only at the end.", minimum=0)
    save_every_n_epochs: int = param(0, "Save Model Frequency (Epochs)", "Write the LoRA after every N finished epochs as well (besides the steps frequency and the end); 0 = off.", minimum=0)
    keep_last_n_saves: int = param(0, "Keep Last N Intermediate Files", "Keep only the newest N LoRA files a run writes on its way (the final file, and the best one by validation loss, are always kept); 0 = keep all.", minimum=0, advanced=True)
    sample_grid_prompts: str = param("", "Sample Grid Prompts", "At each save, draw these prompts (one per line) with the Sample Grid Seeds into one grid picture (samples/<name>_<steps>_grid.png, shown in the gallery): a row per prompt, a column per seed. Blank = off.", advanced=True)
    sample_grid_seeds: str = param("1, 2", "Sample Grid Seeds", "Seeds of the sample grid's columns, e.g. '1, 2, 3': the same at every save, so the pictures compare.", advanced=True)
    save_preview_every_n_steps: int = param(0, "Save Preview(s) Frequency (Step)", "Draw sample pictures every N steps; 0 = none.", minimum=0)
    use_lifetime_steps: bool = param(True, "Use Lifetime Steps/Epochs When Saving", "Name files by the model's total steps over all runs instead of this run's.", advanced=True)
    custom_model_name: str = param("", "Custom Model Name", "Name of the LoRA and merged files; blank: the model's name.")
    new_run: bool = param(False, "Start a New Run", "Start a new run even when the last one stopped before its end (Cancel, a crash); off: a run started again with the same settings finishes the interrupted one exactly. A new run continues from what the model learned.")

    def text_encoder_lora(self, index: int) -> tuple[int, float, float]:
        """(rank, alpha, learning rate) of the adapters on text encoder `index` (in the family's order):
        the Lora Text Encoder fields for the first, the Lora Text Encoder 2 fields for SDXL's second
        (each 0 meaning the first one's value)."""
        first = (self.text_encoder_rank, self.text_encoder_alpha, self.text_encoder_learning_rate)
        if index == 0:
            return first
        second = (self.text_encoder_2_rank, self.text_encoder_2_alpha, self.text_encoder_2_learning_rate)
        return tuple(own or same for own, same in zip(second, first))

    def __post_init__(self):
        check_all_ranges(self)
        if self.resolution % 8:
            raise ConfigError(f"Max Resolution ('resolution') must be a multiple of 8; got {self.resolution}")
