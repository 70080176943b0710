"""Draw the page's app icons (edge_demo/static/icons/*.png) for the web app manifest.

A blue rounded square with a lesion-like dot (64 colours); the maskable icon keeps the dot in the
80 % safe zone. Deterministic (Pillow only), so the committed PNGs can be re-made:

    python scripts/make_icons.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "edge_demo" / "static" / "icons"
BLUE, SKIN, LESION = (11, 107, 203), (240, 205, 180), (110, 62, 44)
# name -> (side in px, maskable: full-bleed background, content within the safe zone)
ICONS = {"icon-192.png": (192, False), "icon-512.png": (512, False),
         "icon-maskable-512.png": (512, True), "apple-touch-icon.png": (180, True)}


def draw(side: int, maskable: bool) -> Image.Image:
    scale = 4  # drawn large, then reduced: smooth edges
    s = side * scale
    im = Image.new("RGBA", (s, s), (0, 0, 0, 0) if not maskable else BLUE + (255,))
    d = ImageDraw.Draw(im)
    if not maskable:
        d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=BLUE + (255,))
    inset = s * (0.22 if maskable else 0.16)
    d.ellipse((inset, inset, s - inset, s - inset), fill=SKIN + (255,))
    c, r = s / 2, s * 0.13
    d.ellipse((c - r * 1.1, c - r, c + r, c + r * 1.05), fill=LESION + (255,))
    return im.resize((side, side), Image.LANCZOS).quantize(64, Image.Quantize.FASTOCTREE)


def main(argv: list[str] | None = None) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (side, maskable) in ICONS.items():
        draw(side, maskable).save(OUT / name, optimize=True)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
