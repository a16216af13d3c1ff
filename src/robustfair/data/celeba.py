"""CelebA (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015) with any attribute
as the label and any attribute, or combination of attributes, as the group; optionally with
folders of generated images per attribute combination (Dr-Fairness, Roh et al., TMLR 2023).

Files under ``data.root`` (or ``data.root/celeba``, torchvision's layout): ``img_align_celeba/``,
``list_attr_celeba.txt`` and ``list_eval_partition.txt`` (without it, the standard index ranges
are used: train [0, 162770), valid [162770, 182637), test [182637, 202599)).

``data.params``:

- ``y``: the label. A CelebA attribute name (``Young``, ``Male``, ``Eyeglasses``...; any case)
  or a Dr-Fairness alias: ``age`` (Young: old 0, young 1), ``gender`` (Male: female 0, male 1),
  ``smiling``, ``glasses``; or ``haircolors`` (3 classes: Black_Hair 0, else Blond_Hair 1,
  else 2).
- ``z``: the group, the same names, or a list of binary attributes combined (the first one most
  significant); ``agegender`` = [Young, Male]: 0 old-female, 1 old-male, 2 young-female,
  3 young-male, as in Dr-Fairness.
- ``size`` (64) and ``crop``: images are resized so that the shorter side is ``size`` (the
  paper's transform starts with ``Resize(64)``) and centre-cropped to ``crop`` (default
  ``size``); stored as uint8 in memory. The paper then resizes to 256 and centre-crops 224, i.e.
  keeps the central 7/8: ``crop: 56`` with the ``resnet50`` model's ``resize: 224`` is the same.
- ``generated``: a folder of generated images in Dr-Fairness's naming
  (``old_male_nosmile_glasses_blackhair/*.png``); ``gen_val`` of them (20,000 as in the paper, or
  a fraction) are held out as the generated validation split (``DataBundle.extra["gen_val"]``),
  the rest join the training split with ``source`` 1.
- ``max_train`` / ``max_val`` / ``max_test`` / ``max_per_folder``: read only a seeded random
  subset (quick runs); ``workers``: threads that decode images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError
from ..registry import format_validation_error
from . import DATASETS
from .core import SPLIT_SEED, ArrayData, DataBundle
from .generated import find_celeba_folders, holdout_indices, list_images, read_images

log = logging.getLogger("robustfair")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDARD_SPLITS = (162770, 182637, 202599)

#: Dr-Fairness's attribute names → CelebA names, and the paper's value names
ALIASES = {"age": "Young", "gender": "Male", "smiling": "Smiling", "smile": "Smiling",
           "glasses": "Eyeglasses"}
VALUE_NAMES = {"Young": ["old", "young"], "Male": ["female", "male"],
               "Smiling": ["nosmile", "smile"], "Eyeglasses": ["noglasses", "glasses"]}
COMBINED = {"agegender": ["Young", "Male"]}
HAIR_NAMES = ["blackhair", "blondhair", "otherhair"]


class CelebAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    y: str = "age"
    z: str | list[str] = "gender"
    size: int = Field(64, ge=8, le=512)
    crop: int | None = Field(None, ge=8)
    generated: str | None = None
    gen_val: float = Field(20000, ge=0)
    max_train: int | None = Field(None, ge=1)
    max_val: int | None = Field(None, ge=1)
    max_test: int | None = Field(None, ge=1)
    max_per_folder: int | None = Field(None, ge=1)
    workers: int = Field(8, ge=1, le=64)


def parse_params(cfg: Any) -> CelebAParams:
    try:
        return CelebAParams(**(cfg.params or {}))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "data.params")) from None


class Attribute:
    """A label or group made of CelebA attributes: one binary attribute, ``haircolors``, or a
    combination of binary attributes (the first one most significant)."""

    def __init__(self, spec: str | list[str], all_names: list[str], where: str) -> None:
        if isinstance(spec, str) and spec.lower() == "haircolors":
            self.parts: list[str] = []
            self.hair = True
            self.num = 3
            self.names = list(HAIR_NAMES)
            return
        self.hair = False
        items = COMBINED.get(spec.lower(), [spec]) if isinstance(spec, str) else list(spec)
        if not items:
            raise UserError(f"{where}: give at least one attribute")
        lookup = {n.lower(): n for n in all_names}
        self.parts = []
        for item in items:
            name = ALIASES.get(item.lower(), item)
            if name.lower() not in lookup:
                raise UserError(f"{where}: unknown CelebA attribute {item!r}; use one of "
                                f"{', '.join(all_names[:6])}..., age, gender, smiling, glasses, "
                                f"haircolors or agegender")
            self.parts.append(lookup[name.lower()])
        self.num = 2 ** len(self.parts)
        per = [VALUE_NAMES.get(p, [f"no-{p}", p]) for p in self.parts]
        self.names = ["-".join(combo) for combo in _product(per)]

    def needs(self) -> list[str]:
        """The CelebA attributes this label or group reads."""
        return ["Black_Hair", "Blond_Hair"] if self.hair else list(self.parts)

    def encode(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """Values (0/1 arrays per CelebA attribute) → integer codes."""
        if self.hair:
            black, blond = values["Black_Hair"], values["Blond_Hair"]
            return np.where(black == 1, 0, np.where(blond == 1, 1, 2)).astype(np.int64)
        code = np.zeros_like(values[self.parts[0]], dtype=np.int64)
        for p in self.parts:
            code = code * 2 + values[p].astype(np.int64)
        return code


def _product(lists: list[list[str]]) -> list[tuple[str, ...]]:
    import itertools

    return list(itertools.product(*lists))


def _root(cfg: Any) -> Path:
    if not cfg.root:
        raise UserError("data.root is not set: CelebA is read from disk; set data.root=DIR (the "
                        "folder with img_align_celeba/ and list_attr_celeba.txt)")
    root = Path(cfg.root).expanduser()
    if (root / "celeba" / "list_attr_celeba.txt").exists():
        root = root / "celeba"
    for need in ("list_attr_celeba.txt", "img_align_celeba"):
        if not (root / need).exists():
            raise UserError(f"{str(root / need)!r} not found; data.root must hold "
                            f"img_align_celeba/ and list_attr_celeba.txt")
    return root


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(file names, attribute names, values in {0, 1} (N, 40)) from ``list_attr_celeba.txt``."""
    lines = path.read_text().splitlines()
    try:
        names = lines[1].split()
        files, rows = [], []
        for line in lines[2:]:
            parts = line.split()
            if not parts:
                continue
            files.append(parts[0])
            rows.append([int(v) for v in parts[1 : 1 + len(names)]])
        values = (np.asarray(rows, dtype=np.int64) + 1) // 2
    except (IndexError, ValueError):
        raise UserError(f"{str(path)!r} is not in CelebA's attribute format") from None
    if values.ndim != 2 or values.shape[1] != len(names):
        raise UserError(f"{str(path)!r}: rows do not have {len(names)} attribute values")
    return files, names, values


def read_partition(root: Path, files: list[str]) -> np.ndarray:
    """0 train, 1 valid, 2 test for every file (from ``list_eval_partition.txt``, else the
    standard index ranges)."""
    path = root / "list_eval_partition.txt"
    if path.exists():
        part = {}
        for line in path.read_text().splitlines():
            bits = line.split()
            if len(bits) >= 2:
                part[bits[0]] = int(bits[1])
        missing = [f for f in files if f not in part]
        if missing:
            raise UserError(f"{str(path)!r} has no split for {missing[0]}; use the matching file")
        return np.asarray([part[f] for f in files], dtype=np.int64)
    idx = np.arange(len(files))
    return np.where(idx < STANDARD_SPLITS[0], 0, np.where(idx < STANDARD_SPLITS[1], 1, 2))


def _subset(idx: np.ndarray, limit: int | None, salt: int) -> np.ndarray:
    if limit is None or limit >= len(idx):
        return idx
    rng = np.random.RandomState(SPLIT_SEED % (2**31) + salt)
    return np.sort(rng.choice(idx, limit, replace=False))


def _real_split(root: Path, files: list[str], rows: np.ndarray, y: np.ndarray, z: np.ndarray,
                p: CelebAParams, channels: int = 3) -> ArrayData:
    paths = [root / "img_align_celeba" / files[i] for i in rows]
    x = read_images(paths, p.size, p.crop or p.size, channels, p.workers)
    return ArrayData(x, torch.from_numpy(y[rows]), torch.from_numpy(z[rows]),
                     torch.zeros(len(rows), dtype=torch.long))


def load_celeba_generated(root: str | Path, y_attr: Attribute, z_attr: Attribute,
                          p: CelebAParams) -> tuple[ArrayData, ArrayData]:
    """(generated training part, generated validation hold-out) from Dr-Fairness folders."""
    folders = find_celeba_folders(Path(root).expanduser())
    token_to_celeba = {"age": "Young", "gender": "Male", "smiling": "Smiling",
                       "glasses": "Eyeglasses"}
    paths, ys, zs = [], [], []
    for folder, tokens in folders:
        values = {token_to_celeba[k]: np.asarray([v]) for k, v in tokens.items()
                  if k in token_to_celeba}
        values["Black_Hair"] = np.asarray([int(tokens["haircolors"] == 0)])
        values["Blond_Hair"] = np.asarray([int(tokens["haircolors"] == 1)])
        try:
            yy, zz = int(y_attr.encode(values)[0]), int(z_attr.encode(values)[0])
        except KeyError as exc:
            raise UserError(f"generated folders name only age, gender, smile, glasses and hair; "
                            f"they cannot give attribute {exc.args[0]!r}") from None
        files = list_images(folder)[: p.max_per_folder] if p.max_per_folder else list_images(
            folder)
        paths += files
        ys += [yy] * len(files)
        zs += [zz] * len(files)
    train_idx, val_idx = holdout_indices(len(paths), p.gen_val, seed=0)
    x = read_images(paths, p.size, p.crop or p.size, 3, p.workers)
    data = ArrayData(x, torch.tensor(ys), torch.tensor(zs), torch.ones(len(paths),
                                                                       dtype=torch.long))
    return data.subset(train_idx), data.subset(val_idx)


@DATASETS.register("celeba")
def celeba(cfg: Any) -> DataBundle:
    """CelebA faces with any attribute as label and any as group (default y=age, z=gender), plus
    optional generated images per attribute combination (Dr-Fairness)."""
    p = parse_params(cfg)
    root = _root(cfg)
    files, names, values = read_attributes(root / "list_attr_celeba.txt")
    y_attr = Attribute(p.y, names, "data.params.y")
    z_attr = Attribute(p.z, names, "data.params.z")
    cols = {n: values[:, i] for i, n in enumerate(names)}
    y, z = y_attr.encode(cols), z_attr.encode(cols)
    part = read_partition(root, files)
    limits = (p.max_train, p.max_val, p.max_test)
    splits = [_real_split(root, files, _subset(np.flatnonzero(part == s), limits[s], s), y, z, p)
              for s in range(3)]
    train, val, test = splits
    extra: dict[str, Any] = {"y": p.y, "z": p.z}
    if p.generated:
        gen_train, gen_val = load_celeba_generated(p.generated, y_attr, z_attr, p)
        log.info("celeba: %d generated training and %d generated validation images",
                 len(gen_train), len(gen_val))
        train = train.concat(gen_train)
        extra["gen_val"] = gen_val
    return DataBundle("celeba", train, val, test, y_attr.num, IMAGENET_MEAN, IMAGENET_STD,
                      "none", y_attr.names, z_attr.names, extra)
