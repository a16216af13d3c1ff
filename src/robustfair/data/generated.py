"""Folders of generated images, one folder per attribute combination, and the image reader shared
with CelebA.

Two folder namings are read:

- Dr-Fairness's CelebA naming (Roh et al., TMLR 2023): five tokens joined by ``_`` in the order
  age, gender, smile, glasses, hair, e.g. ``old_male_nosmile_glasses_blackhair``; token values
  age ∈ {old, young}, gender ∈ {female, male}, smile ∈ {nosmile, smile}, glasses ∈ {noglasses,
  glasses}, hair ∈ {blackhair, blondhair, otherhair} (:func:`parse_celeba_folder`);
- ``LABEL_GROUP`` with a dataset's class and group names, e.g. ``large_inverted``, as
  ``robustfair generate`` writes them (:func:`load_group_folders`).

Generated data are split into training and validation parts as the Dr-Fairness code does: a
fixed random hold-out (``numpy`` seed 0, ``choice`` without replacement), here over the files in
sorted order (the official code lists them in ``os.walk`` order, which depends on the file
system), so the hold-out is the same on every machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .core import ArrayData

log = logging.getLogger("robustfair")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

#: Dr-Fairness's folder tokens, in order, and their values
CELEBA_TOKENS: tuple[str, ...] = ("age", "gender", "smiling", "glasses", "haircolors")
CELEBA_TOKEN_VALUES: dict[str, dict[str, int]] = {
    "age": {"old": 0, "young": 1},
    "gender": {"female": 0, "male": 1},
    "smiling": {"nosmile": 0, "smile": 1, "nosmiling": 0, "smiling": 1},
    "glasses": {"noglasses": 0, "glasses": 1},
    "haircolors": {"blackhair": 0, "blondhair": 1, "otherhair": 2},
}


def list_images(folder: Path) -> list[Path]:
    """The image files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, size: int | None, crop: int | None, channels: int) -> np.ndarray:
    """One image as uint8 (C, H, W): resized so that its shorter side is ``size`` (bilinear,
    as torchvision's ``Resize(size)``), then centre-cropped to ``crop`` × ``crop``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and min(im.size) != size:
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(1, round(w * s)), max(1, round(h * s))),
                               Image.Resampling.BILINEAR)
            if crop is not None:
                w, h = im.size
                if crop > min(w, h):
                    raise UserError(f"data.params.crop={crop} is larger than the resized image "
                                    f"({w}×{h}); use a crop of at most {min(w, h)}")
                left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
                im = im.crop((left, top, left + crop, top + crop))
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise UserError(f"cannot read image {str(path)!r} ({exc}); check the file") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_images(paths: Sequence[Path], size: int | None, crop: int | None, channels: int,
                workers: int = 4) -> Tensor:
    """Many images as one uint8 (N, C, H, W) tensor (all must end up the same size)."""
    if not paths:
        return torch.zeros(0, channels, crop or size or 1, crop or size or 1, dtype=torch.uint8)

    def one(p: Path) -> np.ndarray:
        return read_image(p, size, crop, channels)

    if workers > 1 and len(paths) > 64:
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(one, paths, chunksize=256))
    else:
        arrays = [one(p) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images differ in size {sorted(shapes)[:2]}; set data.params.size "
                        f"(and crop) so that they are resized to one size")
    return torch.from_numpy(np.stack(arrays))


def holdout_indices(n: int, val: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train, validation) indices: ``val`` (a count ≥ 1, or a fraction < 1) drawn at random
    with ``numpy`` seed ``seed`` without replacement, as Dr-Fairness does with seed 0."""
    k = int(round(val * n)) if val < 1 else int(val)
    if k > n:
        raise UserError(f"the generated hold-out ({k}) is larger than the generated data ({n}); "
                        f"lower data.params.gen_val")
    pick = np.random.RandomState(seed).choice(n, k, replace=False) if k else np.zeros(0, int)
    mask = np.zeros(n, dtype=bool)
    mask[pick] = True
    return (torch.from_numpy(np.flatnonzero(~mask)).long(),
            torch.from_numpy(np.flatnonzero(mask)).long())


def parse_celeba_folder(name: str) -> dict[str, int]:
    """``old_male_nosmile_glasses_blackhair`` → {age: 0, gender: 1, smiling: 0, glasses: 1,
    haircolors: 0}; raises ``ValueError`` for another naming."""
    tokens = name.lower().split("_")
    if len(tokens) != len(CELEBA_TOKENS):
        raise ValueError(name)
    out = {}
    for attr, tok in zip(CELEBA_TOKENS, tokens, strict=True):
        if tok not in CELEBA_TOKEN_VALUES[attr]:
            raise ValueError(name)
        out[attr] = CELEBA_TOKEN_VALUES[attr][tok]
    return out


def celeba_folder_name(age: int, gender: int, smiling: int, glasses: int, hair: int) -> str:
    """The Dr-Fairness folder name of an attribute combination (inverse of the parser)."""
    values = (age, gender, smiling, glasses, hair)
    names = []
    for attr, v in zip(CELEBA_TOKENS, values, strict=True):
        names.append(next(k for k, i in CELEBA_TOKEN_VALUES[attr].items() if i == v))
    return "_".join(names)


def find_celeba_folders(root: Path) -> list[tuple[Path, dict[str, int]]]:
    """Every sub-folder of ``root`` with a Dr-Fairness name, sorted by name."""
    if not root.is_dir():
        raise UserError(f"data.params.generated {str(root)!r} is not a folder; check the path")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found.append((sub, parse_celeba_folder(sub.name)))
        except ValueError:
            log.warning("skipping %s: not an age_gender_smile_glasses_hair folder name", sub)
    if not found:
        raise UserError(f"no generated folders named like old_male_nosmile_glasses_blackhair "
                        f"in {str(root)!r}; check data.params.generated")
    return found


def load_group_folders(root: str | Path, class_names: Sequence[str], group_names: Sequence[str],
                       channels: int, size: int | None = None, crop: int | None = None,
                       workers: int = 4, max_per_folder: int | None = None) -> ArrayData:
    """Read ``root/LABEL_GROUP/*.png`` for every (label, group), in (label, group) order, as
    generated data (``source`` 1). A missing folder is an empty cell."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data.params.generated {str(root)!r} is not a folder; write one with "
                        f"'robustfair generate' or check the path")
    paths: list[Path] = []
    ys: list[int] = []
    zs: list[int] = []
    for y, cname in enumerate(class_names):
        for z, gname in enumerate(group_names):
            folder = root / f"{cname}_{gname}"
            files = list_images(folder) if folder.is_dir() else []
            files = files[:max_per_folder] if max_per_folder else files
            paths += files
            ys += [y] * len(files)
            zs += [z] * len(files)
    if not paths:
        raise UserError(f"no LABEL_GROUP folders with images in {str(root)!r} (expected e.g. "
                        f"{class_names[0]}_{group_names[0]}/); write them with 'robustfair "
                        f"generate'")
    x = read_images(paths, size, crop, channels, workers)
    n = len(paths)
    return ArrayData(x, torch.tensor(ys), torch.tensor(zs), torch.ones(n, dtype=torch.long))


def write_group_folders(root: str | Path, x: Tensor, y: Tensor, z: Tensor,
                        class_names: Sequence[str], group_names: Sequence[str]) -> dict[str, int]:
    """Write uint8 images (N, C, H, W) as ``root/LABEL_GROUP/NNNNN.png``; returns the counts."""
    from PIL import Image

    root = Path(root)
    counts: dict[str, int] = {}
    for yy, cname in enumerate(class_names):
        for zz, gname in enumerate(group_names):
            idx = torch.nonzero((y == yy) & (z == zz)).flatten()
            if len(idx) == 0:
                continue
            folder = root / f"{cname}_{gname}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(idx.tolist()):
                arr = x[i].numpy()
                img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
                img.save(folder / f"{j:05d}.png")
            counts[folder.name] = len(idx)
    return counts
