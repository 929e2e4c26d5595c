"""Render a sampling trajectory as an animated GIF (pillow only): the denoising process made
visible, as in MDLM's and LLaDA's demos.

Masked positions are grey boxes, tokens revealed in the current frame are red, older
tokens black. Frames where nothing changed are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

MASK_FILL, NEW_INK, OLD_INK, PAPER = (190, 190, 190), (200, 0, 0), (0, 0, 0), (255, 255, 255)


def _layout(
    tokens: list[str], width: int, draw: ImageDraw.ImageDraw, font
) -> list[tuple[int, int, int]]:
    """(x, y, w) of each token box, wrapping lines at `width` pixels."""
    boxes, x, y, line = [], 8, 8, 16
    for text in tokens:
        w = max(int(draw.textlength(text, font=font)), 6) + 4
        if x + w > width - 8 and x > 8:
            x, y = 8, y + line
        boxes.append((x, y, w))
        x += w
    return boxes


def render_gif(
    trajectory: list[Tensor],
    decode: Callable[[int], str],
    path: str | Path,
    mask_id: int,
    sample: int = 0,
    width: int = 640,
    frame_ms: int = 80,
    max_frames: int = 200,
) -> Path:
    """Write one sample's trajectory (list of (L,) or (B, L) tensors) to `path` as a GIF.

    `decode(token_id) -> str` gives each token's text; masks are drawn, not decoded. Long
    trajectories are subsampled to `max_frames`, always keeping the last frame.
    """
    rows = [(x[sample] if x.dim() == 2 else x).tolist() for x in trajectory]
    rows = [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]  # drop no-op steps
    if len(rows) > max_frames:
        keep = [round(i * (len(rows) - 1) / (max_frames - 1)) for i in range(max_frames)]
        rows = [rows[i] for i in keep]
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    final = [decode(v) if v != mask_id else "____" for v in rows[-1]]
    texts = [max(a, "____", key=len) for a in final]  # boxes wide enough for any frame
    boxes = _layout(texts, width, scratch, font)
    height = boxes[-1][1] + 28 if boxes else 32
    frames, previous = [], rows[0]
    for row in rows:
        image = Image.new("RGB", (width, height), PAPER)
        draw = ImageDraw.Draw(image)
        for (x, y, w), v, old in zip(boxes, row, previous):
            if v == mask_id:
                draw.rectangle([x + 1, y + 2, x + w - 2, y + 13], fill=MASK_FILL)
            else:
                ink = NEW_INK if old == mask_id else OLD_INK
                draw.text((x + 2, y), decode(v), fill=ink, font=font)
        frames.append(image)
        previous = row
    path = Path(path)
    durations = [frame_ms] * (len(frames) - 1) + [max(frame_ms, 2000)]  # linger on the result
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
