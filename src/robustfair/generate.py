"""A small class-and-group-conditional image generator, so that methods that train on real and
generated data (Dr-Fairness, Roh et al., TMLR 2023) run offline.

The generator is a Gaussian mixture per (label y, group z) cell in a PCA space of the real
training images: images are projected on the top ``components`` principal directions, a
``modes``-component full-covariance mixture is fitted to each cell's coordinates, and samples are
mapped back to pixels. Dr-Fairness used LACE on StyleGAN2 instead; what matters for the method is
a generator conditioned on (y, z) whose quality can differ.

Quality ``q`` ∈ [0, 1] turns the samples down in the way that hurts a classifier: each sample's
coordinates are blended with those of a sample of another label (same group),
c = q·c_(y,z) + (1 − q)·c_(y',z), so that the label attribute is rendered less and less
faithfully, and pixel noise of standard deviation 0.3·(1 − q) is added. ``q = 1`` gives the
mixture's own samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .data.core import ArrayData
from .errors import UserError

log = logging.getLogger("robustfair")


@dataclass
class CellMixture:
    """A Gaussian mixture in the PCA space: weights (m,), means (m, k), Cholesky factors
    (m, k, k)."""

    weights: Tensor
    means: Tensor
    chol: Tensor

    def sample(self, n: int, gen: torch.Generator) -> Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        eps = torch.randn(n, self.means.shape[1], generator=gen, dtype=self.means.dtype)
        return self.means[comp] + torch.einsum("nij,nj->ni", self.chol[comp], eps)


def fit_mixture(c: Tensor, modes: int, gen: torch.Generator, iters: int = 20,
                reg: float = 1e-3) -> CellMixture:
    """A ``modes``-component Gaussian mixture of the rows of ``c``: k-means (hard assignment)
    for the components, then each component's weight, mean and full covariance (+ ``reg``·I)."""
    centers = c[torch.randperm(len(c), generator=gen)[:modes]].clone()
    assign = torch.zeros(len(c), dtype=torch.long)
    for _ in range(iters):
        assign = torch.cdist(c, centers).argmin(1)
        for j in range(modes):
            m = assign == j
            if bool(m.any()):
                centers[j] = c[m].mean(0)
    keep = [j for j in range(modes) if int((assign == j).sum()) >= 2]
    eye = torch.eye(c.shape[1], dtype=c.dtype)
    weights, means, chols = [], [], []
    for j in keep:
        cj = c[assign == j]
        d = cj - cj.mean(0)
        weights.append(float(len(cj)))
        means.append(cj.mean(0))
        chols.append(torch.linalg.cholesky(d.t() @ d / len(cj) + reg * eye))
    w = torch.tensor(weights, dtype=c.dtype)
    return CellMixture(w / w.sum(), torch.stack(means), torch.stack(chols))


@dataclass
class GroupGaussianGenerator:
    """Per-(label, group) Gaussian mixtures in a PCA space of the images (see the module
    docstring). Build it with :meth:`fit`; draw images with :meth:`sample`."""

    shape: tuple[int, int, int]
    mean: Tensor  # (D,)
    basis: Tensor  # (k, D)
    cells: dict[tuple[int, int], CellMixture]
    num_classes: int
    num_groups: int

    @classmethod
    def fit(cls, data: ArrayData, num_classes: int, num_groups: int, components: int = 32,
            modes: int = 5, seed: int = 0, max_fit: int = 20000) -> GroupGaussianGenerator:
        """Fit on the real samples of ``data`` (``source`` 0, or all when it has none)."""
        if data.group is None:
            raise UserError("the generator needs data with groups (label × group cells)")
        real = data if data.source is None else data.subset(torch.nonzero(data.source == 0)
                                                            .flatten())
        x = real.images().flatten(1)
        g = torch.Generator().manual_seed(seed)
        fit_idx = torch.randperm(len(x), generator=g)[:max_fit]
        mean = x[fit_idx].mean(0)
        xc = (x[fit_idx] - mean).double()
        k = int(min(components, x.shape[1], len(fit_idx) - 1))
        _, vecs = torch.linalg.eigh(xc.t() @ xc)  # principal directions, ascending
        basis = vecs[:, -k:].flip(1).t().float()
        coords = (x - mean) @ basis.t()
        cells: dict[tuple[int, int], CellMixture] = {}
        for yy in range(num_classes):
            for zz in range(num_groups):
                c = coords[(real.y == yy) & (real.group == zz)].double()
                if len(c) < 2:
                    raise UserError(f"the generator needs at least 2 real images of label {yy}, "
                                    f"group {zz}; the data has {len(c)}")
                cells[(yy, zz)] = fit_mixture(c, max(1, min(modes, len(c) // 30)), g)
        shape = tuple(int(s) for s in data.x.shape[1:])
        return cls(shape, mean.double(), basis.double(), cells, num_classes, num_groups,
                   )  # type: ignore[arg-type]

    def sample(self, y: int, z: int, n: int, quality: float = 1.0,
               gen: torch.Generator | None = None) -> Tensor:
        """``n`` uint8 images (n, C, H, W) of label ``y`` and group ``z`` at ``quality``."""
        if not 0.0 <= quality <= 1.0:
            raise UserError(f"quality={quality}: use a value in [0, 1]")
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        c = self.cells[(y, z)].sample(n, gen)
        if quality < 1.0 and self.num_classes > 1:
            others = [yy for yy in range(self.num_classes) if yy != y]
            pick = torch.randint(len(others), (n,), generator=gen)
            c_other = torch.zeros_like(c)
            for j, yy in enumerate(others):
                m = pick == j
                if bool(m.any()):
                    c_other[m] = self.cells[(yy, z)].sample(int(m.sum()), gen)
            c = quality * c + (1.0 - quality) * c_other
        x = self.mean + c @ self.basis
        if quality < 1.0:
            x = x + 0.3 * (1.0 - quality) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = x.clamp(0, 1).mul(255).round().to(torch.uint8)
        return x.view(n, *self.shape)

    def sample_all(self, per_cell: int, quality: float = 1.0, seed: int = 0) -> ArrayData:
        """``per_cell`` images of every (label, group) cell, in (label, group) order."""
        gen = torch.Generator().manual_seed(seed)
        xs, ys, zs = [], [], []
        for yy in range(self.num_classes):
            for zz in range(self.num_groups):
                xs.append(self.sample(yy, zz, per_cell, quality, gen))
                ys.append(torch.full((per_cell,), yy))
                zs.append(torch.full((per_cell,), zz))
        n = per_cell * self.num_classes * self.num_groups
        return ArrayData(torch.cat(xs), torch.cat(ys), torch.cat(zs),
                         torch.ones(n, dtype=torch.long))


def generate_folders(out_dir: str | Path, data: Any, per_cell: int = 500, quality: float = 1.0,
                     components: int = 32, modes: int = 5, seed: int = 0,
                     force: bool = False) -> dict[str, Any]:
    """Fit the generator on ``data.train`` (a DataBundle with groups) and write
    ``out_dir/LABEL_GROUP/NNNNN.png`` plus ``generator.json``; returns that description."""
    from .data.generated import write_group_folders
    from .engine.io import make_dir

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{str(out)!r} is not empty; choose another folder or add --force")
        import shutil

        shutil.rmtree(out)
    make_dir(out)  # a folder that cannot be written fails here, before the generator is fitted
    if not data.group_names:
        raise UserError(f"dataset {data.name!r} has no groups; the generator is conditioned on "
                        f"(label, group)")
    if any("_" in n for n in list(data.class_names) + list(data.group_names)):
        raise UserError("class and group names must not contain '_' (folders are LABEL_GROUP)")
    gen = GroupGaussianGenerator.fit(data.train, data.num_classes, len(data.group_names),
                                     components, modes, seed)
    sample = gen.sample_all(per_cell, quality, seed)
    counts = write_group_folders(out, sample.x, sample.y, sample.group, data.class_names,
                                 data.group_names)
    info = {"dataset": data.name, "per_cell": per_cell, "quality": quality,
            "components": int(gen.basis.shape[0]), "modes": modes, "seed": seed,
            "class_names": list(data.class_names), "group_names": list(data.group_names),
            "counts": counts, "shape": list(gen.shape)}
    (out / "generator.json").write_text(json.dumps(info, indent=2))
    return info


def generated_for(data: ArrayData, num_classes: int, num_groups: int, per_cell: int,
                  quality: float, components: int = 32, modes: int = 5, seed: int = 0
                  ) -> ArrayData:
    """Fit and sample in memory (the same images ``generate_folders`` writes)."""
    gen = GroupGaussianGenerator.fit(data, num_classes, num_groups, components, modes, seed)
    return gen.sample_all(per_cell, quality, seed)

