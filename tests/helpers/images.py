"""Images made in tests: seeded noise, a folder of odd and bad files, shape pictures."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.helpers.bad_data import BAD, ODD_BUT_VALID, encoded


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_folder(folder):
    """Odd but valid images of several sizes, bad files and a missing one, in a fixed order."""
    folder.mkdir()
    files = {f"{name}.img": data for name, data in ODD_BUT_VALID.items()}
    files |= {f"noise{i}.png": encoded(noise(13 + 5 * i, 17 - 3 * i, i)) for i in range(3)}
    files["transparent_rgb.png"] = encoded(noise(11, 11, 7), transparency=(0, 0, 0))
    files |= {f"{name}.img": data for name, (data, _, reason) in BAD.items() if "image" in reason}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in sorted(files)] + [folder / "missing.png"]


COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "stripe", "dot")


def picture(index: int) -> bytes:
    colour, shape = index % 4, index // 4 % 4
    image = Image.new("RGB", (20, 20), (40, 40, 40))
    fill = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)][colour]
    image.paste(fill, (2 + 3 * shape, 2, 10 + 3 * shape, 18))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
