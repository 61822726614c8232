"""A small synthetic remote-sensing caption dataset, deterministic by seed.

Each class is an aerial-like scene drawn procedurally (runways, fields, water, buildings, trees, roads, cars),
and each image's captions are filled from the attributes actually drawn (how many planes, where the lake is,
which way the road runs), so text and image agree beyond the class. Written in the Karpathy layout:
`OUT/dataset.json`, `OUT/images/{class}_{i:04d}.{ext}`, `OUT/labels.csv`. Used by unit tests and the demo
fallback when the real data is absent.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Scene = tuple[Image.Image, dict[str, str]]

NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
_SAVE = {"jpg": ("JPEG", {"quality": 92}), "png": ("PNG", {}), "tif": ("TIFF", {})}


def _num(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else "many"


def _rgb(rng: np.random.Generator, base: tuple[int, int, int], jitter: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


def _canvas(rng: np.random.Generator, size: int, base: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), _rgb(rng, base))
    return img, ImageDraw.Draw(img)


def _airport(rng, s) -> Scene:
    img, d = _canvas(rng, s, (120, 140, 95))
    orient = str(rng.choice(["horizontal", "vertical", "diagonal"]))
    w = max(3, s // 9)
    if orient == "horizontal":
        y = int(rng.integers(s // 3, 2 * s // 3))
        d.rectangle([2, y - w, s - 3, y + w], fill=_rgb(rng, (70, 70, 72), 8))
        d.line([4, y, s - 5, y], fill=(235, 235, 235), width=1)
    elif orient == "vertical":
        x = int(rng.integers(s // 3, 2 * s // 3))
        d.rectangle([x - w, 2, x + w, s - 3], fill=_rgb(rng, (70, 70, 72), 8))
        d.line([x, 4, x, s - 5], fill=(235, 235, 235), width=1)
    else:
        d.line([0, s - 1, s - 1, 0], fill=_rgb(rng, (70, 70, 72), 8), width=2 * w)
        d.line([3, s - 4, s - 4, 3], fill=(235, 235, 235), width=1)
    tcol, tname = [((200, 200, 205), "white"), ((150, 90, 60), "brown"), ((90, 110, 160), "blue")][rng.integers(3)]
    d.rectangle([s // 12, s // 12, s // 12 + s // 4, s // 12 + s // 8], fill=tcol)
    planes = int(rng.integers(1, 5))
    for _ in range(planes):
        cx, cy, r = int(rng.integers(s // 8, 7 * s // 8)), int(rng.integers(s // 8, 7 * s // 8)), max(2, s // 20)
        d.line([cx - r, cy, cx + r, cy], fill=(245, 245, 245), width=max(1, r // 2))
        d.line([cx, cy - r, cx, cy + r // 2], fill=(245, 245, 245), width=max(1, r // 3))
    return img, {"orient": orient, "n": _num(planes), "planes": "plane" if planes == 1 else "planes",
                 "terminal": tname}


def _farmland(rng, s) -> Scene:
    img, d = _canvas(rng, s, (110, 130, 70))
    n = int(rng.integers(3, 7))
    orient = str(rng.choice(["horizontal", "vertical"]))
    palette = [(95, 150, 60), (190, 170, 90), (140, 110, 70), (70, 120, 50), (170, 180, 80)]
    edges = np.linspace(0, s, n + 1).astype(int)
    for a, b in zip(edges[:-1], edges[1:]):
        col = _rgb(rng, palette[rng.integers(len(palette))], 10)
        d.rectangle([0, a, s, b - 1] if orient == "horizontal" else [a, 0, b - 1, s], fill=col)
    has_house = bool(rng.integers(2))
    if has_house:
        x, y = int(rng.integers(0, s - s // 8)), int(rng.integers(0, s - s // 8))
        d.rectangle([x, y, x + s // 8, y + s // 10], fill=(180, 60, 50))
    return img, {"n": _num(n), "orient": orient,
                 "house": "with a small farmhouse" if has_house else "with no buildings"}


def _forest(rng, s) -> Scene:
    img, d = _canvas(rng, s, (40, 75, 35))
    density = str(rng.choice(["dense", "sparse"]))
    trees = int(s * s / (30 if density == "dense" else 120))
    for _ in range(trees):
        x, y, r = int(rng.integers(0, s)), int(rng.integers(0, s)), int(rng.integers(2, max(3, s // 14)))
        d.ellipse([x - r, y - r, x + r, y + r], fill=_rgb(rng, (30, 95, 35), 20))
    has_path = bool(rng.integers(2))
    if has_path:
        d.line([0, int(rng.integers(0, s)), s, int(rng.integers(0, s))], fill=(150, 125, 90), width=max(1, s // 30))
    return img, {"density": density, "path": "a path crosses the trees" if has_path else "there is no road"}


def _lake(rng, s) -> Scene:
    img, d = _canvas(rng, s, (105, 135, 80))
    pos = str(rng.choice(list(POSITIONS)))
    r = s // 4
    cx, cy = {"left": (s // 4, s // 2), "right": (3 * s // 4, s // 2), "top": (s // 2, s // 4),
              "bottom": (s // 2, 3 * s // 4), "center": (s // 2, s // 2)}[pos]
    d.ellipse([cx - r, cy - r // 1.3, cx + r, cy + r // 1.3], fill=_rgb(rng, (40, 80, 140), 12))
    color = str(rng.choice(["dark blue", "green", "blue"]))
    if color == "green":
        d.ellipse([cx - r // 2, cy - r // 3, cx + r // 2, cy + r // 3], fill=(50, 110, 90))
    trees = int(rng.integers(0, 6))
    for _ in range(trees):
        x, y = int(rng.integers(0, s)), int(rng.integers(0, s))
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(35, 80, 35))
    return img, {"pos": POSITIONS[pos], "color": color, "trees": "some trees" if trees else "grass"}


def _river(rng, s) -> Scene:
    img, d = _canvas(rng, s, (115, 130, 85))
    orient = str(rng.choice(["horizontal", "vertical"]))
    phase, amp = rng.uniform(0, 6.28), rng.uniform(s / 12, s / 5)
    t = np.linspace(0, s, 24)
    wave = s / 2 + amp * np.sin(t / s * 6.28 + phase)
    pts = list(zip(t, wave)) if orient == "horizontal" else list(zip(wave, t))
    d.line([(float(x), float(y)) for x, y in pts], fill=_rgb(rng, (60, 95, 120), 10), width=max(3, s // 8))
    bridge = bool(rng.integers(2))
    if bridge:
        m = s // 2
        if orient == "horizontal":
            d.rectangle([m - 2, 0, m + 2, s], fill=(160, 160, 160))
        else:
            d.rectangle([0, m - 2, s, m + 2], fill=(160, 160, 160))
    return img, {"orient": orient, "bridge": "a bridge crosses it" if bridge else "no bridge crosses it"}


def _residential(rng, s) -> Scene:
    img, d = _canvas(rng, s, (150, 150, 140))
    density = str(rng.choice(["dense", "sparse"]))
    roof, roof_col = [("red", (170, 60, 50)), ("gray", (110, 110, 115)), ("white", (225, 225, 220))][rng.integers(3)]
    step = s // (6 if density == "dense" else 4)
    for gx in range(0, s, step):
        d.line([gx, 0, gx, s], fill=(90, 90, 90), width=max(1, s // 48))
    for gy in range(0, s, step):
        for gx in range(0, s, step):
            if density == "sparse":
                d.rectangle([gx + 2, gy + 2, gx + step - 3, gy + step - 3], fill=_rgb(rng, (90, 140, 70), 10))
            hw = step // 3
            d.rectangle([gx + 3, gy + 3, gx + 3 + hw, gy + 3 + hw], fill=_rgb(rng, roof_col, 12))
    return img, {"density": density, "roof": roof, "arranged": "neatly" if density == "dense" else "loosely"}


def _highway(rng, s) -> Scene:
    img, d = _canvas(rng, s, (125, 135, 95))
    orient = str(rng.choice(["horizontal", "vertical", "diagonal"]))
    w = s // 6
    road = _rgb(rng, (80, 80, 85), 6)
    if orient == "horizontal":
        d.rectangle([0, s // 2 - w, s, s // 2 + w], fill=road)
        d.line([0, s // 2, s, s // 2], fill=(230, 220, 120), width=1)
    elif orient == "vertical":
        d.rectangle([s // 2 - w, 0, s // 2 + w, s], fill=road)
        d.line([s // 2, 0, s // 2, s], fill=(230, 220, 120), width=1)
    else:
        d.line([0, 0, s, s], fill=road, width=2 * w)
        d.line([0, 0, s, s], fill=(230, 220, 120), width=1)
    cars = int(rng.integers(0, 7))
    for _ in range(cars):
        t = rng.uniform(0.1, 0.9) * s
        off = rng.uniform(-w * 0.6, w * 0.6)
        x, y = {"horizontal": (t, s / 2 + off), "vertical": (s / 2 + off, t), "diagonal": (t + off, t - off)}[orient]
        d.rectangle([x - 2, y - 1, x + 2, y + 1], fill=_rgb(rng, (200, 40, 40), 60))
    return img, {"orient": orient, "n": _num(cars), "cars": "car" if cars == 1 else "cars"}


def _parking(rng, s) -> Scene:
    img, d = _canvas(rng, s, (95, 95, 100))
    rows = int(rng.integers(2, 5))
    cars = 0
    gap = s // (rows + 1)
    for r in range(rows):
        y = gap * (r + 1)
        d.line([2, y, s - 3, y], fill=(235, 235, 235), width=1)
        for x in range(4, s - 6, max(5, s // 12)):
            if rng.random() < 0.6:
                d.rectangle([x, y - gap // 3, x + max(2, s // 20), y - 2], fill=_rgb(rng, (150, 150, 160), 90))
                cars += 1
    fullness = "full of" if cars > rows * 6 else "with some"
    return img, {"rows": _num(rows), "fullness": fullness}


def _beach(rng, s) -> Scene:
    img, d = _canvas(rng, s, (215, 195, 150))
    side = str(rng.choice(["left", "right", "top", "bottom"]))
    cut = int(rng.integers(s // 3, 2 * s // 3))
    box = {"left": [0, 0, cut, s], "right": [cut, 0, s, s], "top": [0, 0, s, cut], "bottom": [0, cut, s, s]}[side]
    d.rectangle(box, fill=_rgb(rng, (50, 110, 160), 12))
    for k in range(3):
        off = 3 + 3 * k
        if side in ("left", "right"):
            x = cut - off if side == "left" else cut + off
            d.line([x, 0, x, s], fill=(235, 240, 245), width=1)
        else:
            y = cut - off if side == "top" else cut + off
            d.line([0, y, s, y], fill=(235, 240, 245), width=1)
    people = int(rng.integers(0, 5))
    for _ in range(people):
        x, y = int(rng.integers(0, s)), int(rng.integers(0, s))
        d.point((x, y), fill=(200, 50, 50))
    return img, {"pos": POSITIONS[side], "people": "a few people" if people else "nobody"}


def _industrial(rng, s) -> Scene:
    img, d = _canvas(rng, s, (140, 135, 120))
    n = int(rng.integers(2, 5))
    for _ in range(n):
        x, y = int(rng.integers(0, s - s // 3)), int(rng.integers(0, s - s // 3))
        d.rectangle([x, y, x + int(rng.integers(s // 6, s // 3)), y + int(rng.integers(s // 8, s // 4))],
                    fill=_rgb(rng, (200, 200, 195), 20))
    tanks = int(rng.integers(0, 5))
    for _ in range(tanks):
        x, y, r = int(rng.integers(0, s)), int(rng.integers(0, s)), max(2, s // 16)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(230, 230, 230), outline=(90, 90, 90))
    return img, {"n": _num(n), "tanks": f"{_num(tanks)} storage tanks" if tanks else "no storage tanks"}


# class -> (painter, caption templates filled from the painter's attributes)
SCENES: dict[str, tuple[Callable[[np.random.Generator, int], Scene], list[str]]] = {
    "airport": (_airport, [
        "an airport with a {orient} runway and {n} {planes} .",
        "{n} {planes} near a long {orient} runway .",
        "a {terminal} terminal building stands beside the runway of the airport .",
        "the runway of this airport runs {orient} through the image .",
        "there is a {orient} runway with {n} {planes} around it .",
        "many grass areas surround an airport with a {terminal} terminal .",
    ]),
    "farmland": (_farmland, [
        "{n} {orient} strips of farmland {house} .",
        "the farmland is divided into {n} fields of different colors .",
        "several {orient} fields of crops {house} .",
        "green and yellow farmland arranged in {orient} strips .",
        "a piece of cropland made of {n} rectangular fields .",
        "this is farmland {house} .",
    ]),
    "forest": (_forest, [
        "a {density} forest where {path} .",
        "many green trees form a {density} forest .",
        "the {density} forest is dark green and {path} .",
        "lots of trees grow closely in this {density} woodland .",
        "a piece of {density} forest ; {path} .",
        "dark green trees cover the whole image .",
    ]),
    "lake": (_lake, [
        "a {color} lake {pos} surrounded by {trees} .",
        "there is a lake {pos} of the image .",
        "a pond of {color} water lies {pos} .",
        "{trees} around a {color} lake {pos} .",
        "the lake {pos} is surrounded by green land .",
        "a calm lake lies {pos} among the meadows .",
    ]),
    "river": (_river, [
        "a winding river runs {orient} and {bridge} .",
        "a {orient} river curves through the green land .",
        "the river flows {orient} across the image ; {bridge} .",
        "a curved river with grassland on both sides .",
        "there is a river running {orient} and {bridge} .",
        "green fields lie on both banks of a winding river .",
    ]),
    "residential": (_residential, [
        "a {density} residential area with {roof} roofs arranged {arranged} .",
        "many houses with {roof} roofs are arranged {arranged} along the roads .",
        "this is a {density} residential area divided by roads .",
        "houses with {roof} roofs stand {arranged} in rows .",
        "a {density} neighborhood of small houses and streets .",
        "lots of buildings with {roof} roofs in a residential area .",
    ]),
    "highway": (_highway, [
        "a {orient} highway with {n} {cars} on it .",
        "{n} {cars} drive along a {orient} road .",
        "a wide road runs {orient} through the green land .",
        "there is a {orient} highway with a yellow center line .",
        "a highway crosses the image {orient} with {n} {cars} .",
        "the road is surrounded by grass on both sides .",
    ]),
    "parking": (_parking, [
        "a parking lot with {rows} rows {fullness} cars .",
        "many cars parked in {rows} rows in a parking lot .",
        "a gray parking lot {fullness} cars .",
        "cars are parked neatly in {rows} rows .",
        "this parking lot has {rows} rows of parking spaces .",
        "a large parking lot with white lines on the ground .",
    ]),
    "beach": (_beach, [
        "a beach with the sea {pos} and {people} on the sand .",
        "blue sea water {pos} next to yellow sand .",
        "white waves along a sandy beach with the sea {pos} .",
        "the beach is next to the sea {pos} .",
        "{people} on a yellow beach beside blue water .",
        "a sandy beach meets the ocean {pos} .",
    ]),
    "industrial": (_industrial, [
        "an industrial area with {n} large buildings and {tanks} .",
        "{n} big white factory buildings and {tanks} .",
        "several large plants in an industrial area with {tanks} .",
        "there are {n} factory buildings with white roofs .",
        "an industrial zone with {tanks} near the buildings .",
        "large white buildings in a gray industrial area .",
    ]),
}
CLASSES = tuple(sorted(SCENES))


def _add_texture(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(img.height, img.width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_scene(class_name: str, *, seed: int, index: int, size: int) -> tuple[Image.Image, dict[str, str]]:
    """Draw one scene of `class_name`; the same (seed, class, index, size) always gives the same pixels."""
    painter, _ = SCENES[class_name]
    rng = np.random.default_rng([seed, CLASSES.index(class_name), index])
    img, attrs = painter(rng, size)
    return _add_texture(img, rng), attrs


def make_captions(class_name: str, attrs: dict[str, str], *, n: int, rng: np.random.Generator) -> list[str]:
    templates = SCENES[class_name][1]
    order = rng.permutation(len(templates))
    return [templates[order[i % len(templates)]].format(**attrs) for i in range(n)]


def assign_splits(n: int, rng: np.random.Generator, fractions: tuple[float, float, float]) -> list[str]:
    """Per-class split labels: at least one val and one test image once a class has 3 or more images."""
    if n < 3:
        return ["train"] * n
    n_val = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    labels = ["val"] * n_val + ["test"] * n_test
    labels = ["train"] * (n - len(labels)) + labels
    return [labels[i] for i in rng.permutation(n)]


def generate_synthetic(
    out_dir: str | os.PathLike,
    *,
    n_per_class: int = 10,
    seed: int = 0,
    size: int = 64,
    classes: list[str] | tuple[str, ...] | None = None,
    captions_per_image: int = 5,
    image_format: str = "jpg",
    name: str = "synthetic",
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> Path:
    """Write a synthetic dataset to `out_dir` and return it as a Path.

    `classes` picks scene classes (default: all of `CLASSES`); `image_format` is jpg, png or tif. Re-running
    with the same arguments rewrites identical files; `dataset.json` is written last (the commit point).
    """
    classes = tuple(CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in SCENES]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; available: {', '.join(CLASSES)}")
    if image_format not in _SAVE:
        raise ValueError(f"image_format {image_format!r} must be one of {', '.join(_SAVE)}")
    if n_per_class < 1 or size < 16:
        raise ValueError("need n_per_class >= 1 and size >= 16")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pil_format, save_kw = _SAVE[image_format]
    images, labels, sentid = [], [], 0
    for cls in sorted(classes):
        splits = assign_splits(n_per_class, np.random.default_rng([seed, CLASSES.index(cls), 1 << 30]), split_fractions)
        for i in range(n_per_class):
            img, attrs = render_scene(cls, seed=seed, index=i, size=size)
            filename = f"{cls}_{i:04d}.{image_format}"
            buf = io.BytesIO()
            img.save(buf, format=pil_format, **save_kw)
            _write_atomic(out / "images" / filename, buf.getvalue())
            rng = np.random.default_rng([seed, CLASSES.index(cls), i, 7])
            captions = make_captions(cls, attrs, n=captions_per_image, rng=rng)
            imgid = len(images)
            images.append({
                "filename": filename,
                "imgid": imgid,
                "split": splits[i],
                "sentids": list(range(sentid, sentid + len(captions))),
                "sentences": [
                    {"raw": c, "tokens": c.replace(" .", "").replace(" ;", "").split(), "imgid": imgid,
                     "sentid": sentid + k}
                    for k, c in enumerate(captions)
                ],
            })
            sentid += len(captions)
            labels.append((filename, cls))
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["filename", "class"])
    writer.writerows(labels)
    _write_atomic(out / "labels.csv", rows.getvalue().encode())
    _write_atomic(out / "dataset.json", json.dumps({"dataset": name, "images": images}, indent=1).encode())
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
