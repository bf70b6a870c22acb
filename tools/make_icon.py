"""Draws icon.png, the pack's icon for the ComfyUI registry ([tool.comfy] Icon; the registry accepts
SVG/PNG/JPG/GIF up to 800x400 px): a lightning bolt (speed) over stacked low-rank bars (LoRA layers)."""
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# Usage: python tools/make_icon.py [REPO_ROOT]   (default: the repository this file is in)
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
SIZE, SCALE = 400, 4  # drawn 4x larger, then downsampled for smooth edges


def main() -> None:
    s = SIZE * SCALE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.rounded_rectangle([0, 0, s - 1, s - 1], radius=s // 7, fill=(28, 30, 44, 255))
    # Three LoRA bars of decreasing width (rank), left-aligned, behind the bolt.
    for i, (width, colour) in enumerate([(0.70, (124, 77, 160)), (0.52, (96, 112, 190)), (0.34, (62, 150, 120))]):
        y = s * (0.22 + 0.2 * i)
        draw.rounded_rectangle([s * 0.14, y, s * (0.14 + width), y + s * 0.12], radius=s // 40,
                               fill=(*colour, 255))
    bolt = [(0.60, 0.08), (0.34, 0.54), (0.52, 0.54), (0.42, 0.92), (0.80, 0.40), (0.60, 0.40), (0.72, 0.08)]
    draw.polygon([(x * s, y * s) for x, y in bolt], fill=(250, 204, 60, 255), outline=(255, 236, 150, 255))
    img.resize((SIZE, SIZE), Image.LANCZOS).save(ROOT / "icon.png", optimize=True)


if __name__ == "__main__":
    main()
