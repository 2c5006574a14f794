"""What the "Train" tab shows of a job: the progress line and bar as HTML, the loss plot as a picture.

The loss plot is drawn with PIL, so it looks the same on every gradio version
and needs no plotting library. No gradio in this module.
"""
from __future__ import annotations

import html
import math

from PIL import Image, ImageDraw

from ..jobs import JobState

PLOT_SIZE = (480, 200)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_figures(state: JobState) -> list[str]:
    """"Step 3/10", "loss 0.1234", "1.5 it/s", "memory 812 MB", "time left 00:12": those that are known."""
    p = state.progress
    figures = []
    if p.total_steps:
        figures.append(f"Step {p.step}/{p.total_steps}" if p.job == "train" else f"{100 * p.fraction:.0f}%")
    loss = p.loss if p.loss is not None else (state.losses[-1][1] if state.losses else None)
    if loss is not None:
        figures.append(f"loss {loss:.4f}")
    if p.it_per_s is not None:
        figures.append(f"{p.it_per_s:.2f} it/s")
    if p.memory_mb is not None:
        figures.append(f"memory {p.memory_mb:,.0f} MB")
    if state.running and p.seconds_left is not None:
        figures.append(f"time left {format_seconds(p.seconds_left)}")
    if p.lifetime_steps is not None:
        figures.append(f"lifetime steps {p.lifetime_steps}")
    return figures


def progress_html(state: JobState) -> str:
    """The progress bar with its figures; inline styles so it needs no stylesheet."""
    fraction = state.progress.fraction
    if not state.running and state.name and not state.error and not state.cancelled:
        fraction = 1.0  # finished
    figures = " · ".join(progress_figures(state)) or ("Idle" if not state.running else "Starting")
    percent = f"{100 * fraction:.1f}"
    return (f'<div id="lora_trainer_progress_box" data-job="{html.escape(state.kind)}" '
            f'data-running="{str(state.running).lower()}" data-step="{state.progress.step}">'
            f'<div class="lora_trainer_bar" style="width:100%;height:14px;border-radius:7px;background:#8884;overflow:hidden">'
            f'<div class="lora_trainer_bar_fill" style="width:{percent}%;height:100%;background:#f97316;'
            f'transition:width .3s"></div></div>'
            f'<div class="lora_trainer_figures" style="margin-top:4px;font-variant-numeric:tabular-nums">'
            f'{html.escape(figures)}</div></div>')


def status_html(state: JobState) -> str:
    return f'<div id="lora_trainer_status_line" data-running="{str(state.running).lower()}">{html.escape(state.status)}</div>'


VALIDATION_COLOR = "#2563eb"

def loss_plot(losses: list[tuple[int, float]], val_losses: list[tuple[int, float]] = (),
              size: tuple[int, int] = PLOT_SIZE) -> Image.Image:
    """Loss over steps as a line with its range written on the axes; a moving average when noisy; the
    validation loss (when measured) as a blue line with dots on the same axes."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 10, 28, height - 22
    draw.rectangle([left, top, right, bottom], outline="#999999")
    points = [(s, l) for s, l in losses if math.isfinite(l)]
    if not points:
        draw.text((left + 10, (top + bottom) // 2 - 6), "no loss yet", fill="#666666")
        return image
    validation = [(s, l) for s, l in val_losses if math.isfinite(l)]
    steps = [s for s, _ in points]
    values = [l for _, l in points]
    lo, hi = min(values + [l for _, l in validation]), max(values + [l for _, l in validation])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min(steps + [s for s, _ in validation]), max(steps + [s for s, _ in validation])
    span = max(s1 - s0, 1)

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (left + (step - s0) / span * (right - left), bottom - (loss - lo) / (hi - lo) * (bottom - top))

    draw.line([xy(s, l) for s, l in points] if len(points) > 1 else [xy(s0, values[0])] * 2, fill="#f9a36b", width=1)
    window = max(1, len(points) // 20)
    if window > 1:
        smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                  for i in range(len(values))]
        draw.line([xy(s, l) for s, l in zip(steps, smooth)], fill="#c2410c", width=2)
    if validation:
        dots = [xy(s, l) for s, l in validation]
        if len(dots) > 1:
            draw.line(dots, fill=VALIDATION_COLOR, width=2)
        for x, y in dots:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=VALIDATION_COLOR)
        draw.text((left + 46, top + 2), "validation", fill=VALIDATION_COLOR)
    draw.text((2, top), f"{hi:.3g}", fill="#333333")
    draw.text((2, bottom - 10), f"{lo:.3g}", fill="#333333")
    draw.text((left, bottom + 5), f"step {s0}", fill="#333333")
    draw.text((right - 70, bottom + 5), f"step {s1}", fill="#333333")
    draw.text((left + 6, top + 2), "loss", fill="#333333")
    return image
