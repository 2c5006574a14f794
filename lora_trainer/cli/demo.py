"""`demo`: the whole path on the built-in tiny model, with nothing downloaded.

Tiny checkpoint -> Create Model -> instance pictures drawn here (with
captions) -> class pictures generated -> a short LoRA training with prior
preservation on the CPU -> the LoRA file -> Generate Ckpt (merge) -> a
picture drawn with the merged checkpoint. Each path is printed. The demo's
files live under DIR; running it again starts the model afresh.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

from PIL import Image, ImageDraw

from ..checkpoint import create_model
from ..config import Concept, ModelInfo, TrainingParams
from ..host import ModelsDir
from ..merge import merge_lora
from ..preview import generate_picture
from ..tiny import write_tiny_checkpoint
from ..tiny_sdxl import write_tiny_xl_checkpoint
from ..train import train
from . import add_models_dir

log = logging.getLogger(__name__)
DEMO_MODEL = "tiny-demo"
# --model-type -> (writer of the tiny checkpoint, working model name)
TINY_MODELS = {"sd1": (write_tiny_checkpoint, DEMO_MODEL),
               "sd2-v": (functools.partial(write_tiny_checkpoint, v2=True), "tiny-demo-sd2v"),
               "sdxl": (write_tiny_xl_checkpoint, "tiny-demo-sdxl")}
DEMO_FOLDER = "demo"
SHAPES = (("circle", (220, 40, 40)), ("square", (40, 90, 220)), ("triangle", (30, 160, 60)), ("circle", (240, 170, 20)))
INSTANCE_PROMPT = "scs shape, [filewords]"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole path on a built-in tiny model (no downloads)")
    add_models_dir(p)
    p.add_argument("--steps", type=int, default=8, help="training steps (default: 8)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--model-type", choices=tuple(TINY_MODELS), default="sd1",
                   help="family of the tiny model: sd1, sd2-v (SD 2.x, v-prediction) or sdxl (default: sd1)")
    p.set_defaults(run=run)


def draw_pictures(folder: Path, size: int = 64) -> Path:
    """A few coloured shapes on white, each with a caption .txt; return the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, (shape, colour) in enumerate(SHAPES):
        image = Image.new("RGB", (size + 16 * number, size), "white")  # not all square: resized like real pictures
        draw = ImageDraw.Draw(image)
        box = (8, 8, image.width - 8, size - 8)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
        image.save(folder / f"shape_{number}.png")
        (folder / f"shape_{number}.txt").write_text(f"a {shape} on white", encoding="utf-8")
    return folder


def run(args) -> int:
    models = ModelsDir.at(args.models_dir)
    write, model_name = TINY_MODELS[getattr(args, "model_type", "sd1")]
    checkpoint = write(models.checkpoints, for_webui=True)
    print(checkpoint)
    model_dir = create_model(models, checkpoint.name, model_name, overwrite=True)
    print(model_dir)
    info = ModelInfo.load(model_dir / "model_info.json")
    pictures = draw_pictures(Path(args.models_dir) / DEMO_FOLDER / "pictures", size=info.resolution)
    print(pictures)
    concept = Concept(instance_data_dir=str(pictures), instance_prompt=INSTANCE_PROMPT, class_prompt="shape",
                      num_class_images=4, class_infer_steps=2, save_sample_prompt="scs shape, a circle on white",
                      save_infer_steps=2)
    params = TrainingParams(resolution=info.resolution, max_train_steps=args.steps, num_train_epochs=args.steps,
                            train_batch_size=2, unet_learning_rate=1e-3, text_encoder_learning_rate=5e-4, seed=0,
                            save_preview_every_n_steps=args.steps)
    result = train(models, model_name, params, [concept], device=args.device)
    print(model_dir / "classifiers_0")
    for sample in result.samples:
        print(sample)
    print(result.lora_path)
    merged = merge_lora(models, model_name, lora=str(result.lora_path), overwrite=True)
    print(merged)
    picture = generate_picture(merged, "scs shape, a circle on white", Path(args.models_dir) / DEMO_FOLDER / "picture.png",
                               steps=4, device=args.device)
    print(picture)
    return 0
