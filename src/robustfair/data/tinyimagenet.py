"""Tiny-ImageNet-200 from its standard folder layout (64×64 colour, 200 classes).

Layout (as distributed by Stanford CS231n, ``tiny-imagenet-200.zip``), under ``data.root`` or
``data.root/tiny-imagenet-200``::

    wnids.txt                          one WordNet id per line: the classes, in label order
    words.txt                          optional: "wnid<TAB>names" (class names)
    train/<wnid>/images/*.JPEG         500 training images per class
    val/images/*.JPEG                  10,000 validation images
    val/val_annotations.txt            "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

The labelled ``val`` split is used as the test split (the test split's labels are not public).
A few images are greyscale JPEGs; they are converted to RGB. Nothing is downloaded.
Set ``data.params.cache: true`` to keep the decoded arrays in ``robustfair_cache.npz`` beside
the data (about 1.2 GB; decoding 110,000 JPEGs takes a minute or two).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from . import DATASETS
from .core import ArrayData, DataBundle

# Channel statistics of the Tiny-ImageNet training set (commonly used values).
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
SIZE = 64


def find_root(root: str | None) -> Path:
    """The folder that holds ``wnids.txt``: ``root`` itself or ``root/tiny-imagenet-200``."""
    if not root:
        raise UserError("data.root is not set: tiny-imagenet is read from disk; set "
                        "data.root=DIR (the folder with tiny-imagenet-200/)")
    base = Path(root).expanduser()
    for cand in (base, base / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file():
            return cand
    raise UserError(f"no wnids.txt under {str(base)!r} or {str(base / 'tiny-imagenet-200')!r}; "
                    f"set data.root to the unpacked tiny-imagenet-200 folder")


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (SIZE, SIZE):
            im = im.resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _read_all(paths: list[Path]) -> torch.Tensor:
    if not paths:
        return torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrs = list(pool.map(_read_image, paths, chunksize=256))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def _class_names(folder: Path, wnids: list[str]) -> list[str]:
    words = folder / "words.txt"
    if not words.is_file():
        return list(wnids)
    table: dict[str, str] = {}
    for line in words.read_text(encoding="utf-8").splitlines():
        wnid, _, names = line.partition("\t")
        table[wnid.strip()] = names.split(",")[0].strip()
    return [table.get(w, w) for w in wnids]


def list_split(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int], list[Path],
                                                        list[int]]:
    """Image paths and labels of the train and val splits."""
    label = {w: i for i, w in enumerate(wnids)}
    train_paths: list[Path] = []
    train_y: list[int] = []
    for w in wnids:
        imgs = sorted((folder / "train" / w / "images").glob("*.JPEG"))
        if not imgs:
            raise UserError(f"no images in {str(folder / 'train' / w / 'images')!r}; the folder "
                            f"is incomplete, unpack tiny-imagenet-200 again")
        train_paths += imgs
        train_y += [label[w]] * len(imgs)
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"{str(ann)!r} is missing; the folder is incomplete, unpack "
                        f"tiny-imagenet-200 again")
    val_paths: list[Path] = []
    val_y: list[int] = []
    for line in ann.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        if parts[1] not in label:
            raise UserError(f"{str(ann)!r}: class {parts[1]!r} is not in wnids.txt")
        val_paths.append(folder / "val" / "images" / parts[0])
        val_y.append(label[parts[1]])
    return train_paths, train_y, val_paths, val_y


def _load_arrays(folder: Path, wnids: list[str], cache: bool) -> dict[str, torch.Tensor]:
    cache_file = folder / "robustfair_cache.npz"
    if cache and cache_file.is_file():
        with np.load(cache_file) as z:
            return {k: torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_val", "y_val")}
    tp, ty, vp, vy = list_split(folder, wnids)
    arrays = {"x_train": _read_all(tp), "y_train": torch.tensor(ty, dtype=torch.long),
              "x_val": _read_all(vp), "y_val": torch.tensor(vy, dtype=torch.long)}
    if cache:
        from ..engine.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, **{k: v.numpy() for k, v in arrays.items()})
        atomic_write_bytes(cache_file, buf.getvalue())
    return arrays


@DATASETS.register("tiny-imagenet")
def tiny_imagenet(cfg: Any) -> DataBundle:
    """Tiny-ImageNet-200 from its standard folders under data.root, 64×64 colour, 200 classes
    (the labelled val split is the test split)."""
    folder = find_root(cfg.root)
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
    if len(wnids) < 2:
        raise UserError(f"{str(folder / 'wnids.txt')!r} lists {len(wnids)} classes; need >= 2")
    a = _load_arrays(folder, wnids, bool(cfg.params.get("cache", False)))
    train = ArrayData(a["x_train"], a["y_train"])
    test = ArrayData(a["x_val"], a["y_val"])
    empty = ArrayData(train.x[:0], train.y[:0])
    return DataBundle("tiny-imagenet", train, empty, test, len(wnids), MEAN, STD, "crop_flip",
                      _class_names(folder, wnids))
