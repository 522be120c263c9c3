"""Build data/smoke/*.tar: real photos shipped inside scikit-image, scikit-learn and matplotlib, laid out
exactly as img2dataset writes a WebDataset shard (KEY.jpg, KEY.txt alt-text, KEY.json metadata), plus one
truncated JPEG and one thumbnail so the small-shard run shows rejections too.

    python scripts/make_smoke_shard.py data/smoke
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import skimage.data as sk
from PIL import Image
from sklearn.datasets import load_sample_images

ALT = {
    "astronaut": "Astronaut Eileen Collins in an orange flight suit, official NASA portrait with the US flag",
    "chelsea": "tabby cat Chelsea looking to the side",
    "coffee": "a cup of coffee on a saucer with a spoon, top view",
    "rocket": "Falcon 9 rocket on the launch pad",
    "hubble_deep_field": "Hubble deep field: thousands of galaxies",
    "immunohistochemistry": "microscope slide, immunohistochemistry stain",
    "retina": "fundus photograph of a human retina",
    "camera": "black and white photo of a man with a camera on a tripod",
    "moon": "grayscale surface of the moon with craters",
    "coins": "old coins on a table",
    "cat": "cat {{ config.__class__ }} {% raw %}portrait{% endraw %}",  # web text that looks like a template
    "clock": "wall clock",
    "brick": "brick wall texture",
    "grass": "grass close up",
    "gravel": "gravel",
    "colorwheel": "colour wheel",
    "china": "Summer Palace, Beijing: a pagoda among trees",
    "flower": "a pink flower with green leaves",
    "grace_hopper": "Rear Admiral Grace Hopper in uniform",
}


def photos():
    for name in ALT:
        if name in ("china", "flower"):
            continue
        if name == "grace_hopper":
            continue
        arr = getattr(sk, name)()
        yield name, Image.fromarray(arr.astype(np.uint8))
    sample = load_sample_images()
    for fname, arr in zip(sample.filenames, sample.images):
        yield Path(fname).stem, Image.fromarray(arr)
    import matplotlib.cbook as cbook

    yield "grace_hopper", Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(photos())
    # Two shards: multi-shard behaviour (resume, per-shard stats) shows even in the smoke run.
    halves = [items[: len(items) // 2], items[len(items) // 2:]]
    index = 0
    for shard_no, part in enumerate(halves):
        with tarfile.open(out / f"smoke-{shard_no:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, img in part:
                key = f"{index:09d}"
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
                if name == "coins":
                    data = data[: len(data) // 3]  # a truncated download
                if name == "clock":
                    small = img.copy()
                    small.thumbnail((96, 96))
                    buf = io.BytesIO()
                    small.save(buf, format="JPEG", quality=90)
                    data = buf.getvalue()
                meta = {"url": f"https://example.org/images/{name}.jpg", "key": key, "status": "success",
                        "caption": ALT[name], "width": img.width, "height": img.height,
                        "original_width": img.width, "original_height": img.height}
                add(tar, f"{key}.jpg", data)
                add(tar, f"{key}.txt", ALT[name].encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
                index += 1
    print(f"wrote {index} samples to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/smoke")
