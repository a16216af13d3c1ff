"""The AT-on-AD datasets: imbalanced two-class mixtures of symmetric α-stable distributions, and
binary one-class-against-the-rest tasks cut from image datasets.

Hu, Wu, Zhang, Zhao, "Understanding the Impact of Adversarial Robustness on Accuracy
Disparity", ICML 2023 (arXiv:2211.15762). The official repository ships no data and no
generator, so the mixture below is this library's own, with every parameter configurable.

**The stable mixture** (``stable-mixture``). Class y ∈ {0, 1} has mean μ_y = s_y·μ with
s_0 = −1, s_1 = +1, and

    x = μ_y + c_y·σ ⊙ z,   z_1, …, z_d i.i.d. standard symmetric α-stable,

where "standard" means the characteristic function E exp(i t z_j) = exp(−|t|^α) (scipy's
``levy_stable(alpha, 0)`` with scale 1). So σ is the *scale parameter* of each coordinate's
noise: for α = 2 (Gaussian) each coordinate has standard deviation σ√2, for α = 1 (Cauchy) σ is
the half-width at half-maximum, α = 1.5 is the Holtsmark distribution. μ and σ are scalars (μ·1,
σ·1: the official setting) or vectors, written out or as a profile of runs, e.g.
``mu: [{value: 4, count: 20}, {value: 1, count: 80}]``; c_y (``class_scale``, default 1, 1)
scales the noise of each class. Class 0 is the majority:
n_0 = N and n_1 = N/R training samples (and the same for validation); the imbalanced test set has
``n_test`` and ``n_test``/R samples, the balanced one ``n_test`` of each class.

Closed form for linear classifiers. For f(x) = w·x + b, predicting class 1 iff f(x) > 0, stability
gives (w ⊙ σ)·z ~ ‖w ⊙ σ‖_α·z_1 with ‖v‖_α = (Σ_j |v_j|^α)^(1/α), hence

    P(correct | y) = F_α((w·μ + s_y·b − ε‖w‖_*) / (c_y‖w ⊙ σ‖_α)),

with ε = 0 for clean accuracy and ‖·‖_* the dual norm of the attack's (ℓ1 for ℓ∞, ℓ2 for ℓ2)
under the worst ε-perturbation; F_α is the standard symmetric α-stable CDF (F_2(t) = Φ(t/√2),
F_1(t) = 1/2 + arctan(t)/π). For scalar μ, σ, α = 2 and equal priors the best classifier is
w ∝ 1, b = 0 (the Bayes rule), and the ℓ2- and ℓ∞-robust linear rules point the same way; with
unequal coordinates (a vector μ or σ) they do not (:mod:`robustfair.studies.oracle`).

Default μ and σ per α (d = 100), chosen so that the balanced problem's best linear accuracy is
high but not perfect and the paper's ε grids (specs part_atad §2.4) visibly lower the accuracy
that the best linear rule keeps under attack:

====== ==== ==== ============== ============================== ==============================
α      μ    σ    best accuracy  robust, ℓ2 grid (ε high→low)    robust, ℓ∞ grid (ε high→low)
====== ==== ==== ============== ============================== ==============================
2      2    8    0.961          0.908, 0.925, 0.939            0.812, 0.865, 0.908
1.5    1    1.5  0.951          0.909, 0.923, 0.935            0.823, 0.877, 0.913
1      20   3    0.953          0.946, 0.948, 0.950            0.843, 0.900, 0.927
====== ==== ==== ============== ============================== ==============================

(For α = 1 the ℓ2 grid costs less than a point: ‖w‖_2 ≪ ‖w‖_1 for the dense direction.)

Default sizes: N = 4000 majority training samples and 1000 majority validation samples (the
minority has N/R of each). With fewer, standard training of a linear model (Adam, early stopping)
stays visibly below the Bayes accuracy in d = 100 (about 1 point at N = 1000, R = 1), and the
comparison with adversarial training, which then also acts as a regulariser, mixes estimation
error into the effect of robustness.

**Binary tasks** (``mnist-binary``, ``fashion-mnist-binary``, ``cifar10-binary``,
``mnist5k-binary``): class 0 is one original class (``one_class``: 1, 1, 3 (cat) and 1 as in
the official code), class 1 is every other class. ``majority`` says which of the two has N
samples (class 0, except Fashion-MNIST where the official code makes "the rest" the majority).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UserError
from ..registry import format_validation_error
from . import DATASETS
from .core import ArrayData, DataBundle

#: (μ, σ) defaults per α, see the module docstring.
DEFAULT_MU_SIGMA: dict[float, tuple[float, float]] = {2.0: (2.0, 8.0), 1.5: (1.0, 1.5),
                                                      1.0: (20.0, 3.0)}
ALPHA_NAMES = {2.0: "gaussian", 1.5: "holtsmark", 1.0: "cauchy"}


# ------------------------------------------------------------------------------------------
# symmetric α-stable law: sampler, CDF, closed-form accuracy


def sample_symmetric_stable(
    alpha: float, size: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Standard symmetric α-stable samples (characteristic function exp(−|t|^α)), float64.

    Chambers–Mallows–Stuck (1976) with β = 0: V ~ U(−π/2, π/2), W ~ Exp(1),
    X = sin(αV)/cos(V)^(1/α) · (cos((1−α)V)/W)^((1−α)/α). α = 2 gives N(0, 2), α = 1 tan(V).
    The uniforms are drawn in row-major order, so the first k rows of size (n, …) do not depend
    on n.
    """
    if not 0.0 < alpha <= 2.0:
        raise ValueError(f"alpha must lie in (0, 2], got {alpha}")
    u = rng.random((*size, 2))
    v = math.pi * (u[..., 0] - 0.5)
    w = -np.log1p(-u[..., 1])
    if alpha == 1.0:
        return np.tan(v)
    a = alpha
    return np.sin(a * v) / np.cos(v) ** (1.0 / a) * (np.cos((1.0 - a) * v) / w) ** ((1.0 - a) / a)


def stable_cdf(t: np.ndarray | float, alpha: float) -> np.ndarray:
    """F_α(t), the CDF of the standard symmetric α-stable law (characteristic fn exp(−|t|^α)).

    Closed forms for α = 2 (Φ(t/√2)) and α = 1 (Cauchy); otherwise ``scipy.stats.levy_stable``,
    which is slow: call it on few points."""
    t = np.asarray(t, dtype=np.float64)
    if alpha == 2.0:
        from scipy.special import ndtr

        return ndtr(t / math.sqrt(2.0))
    if alpha == 1.0:
        return 0.5 + np.arctan(t) / math.pi
    from scipy.stats import levy_stable

    return np.asarray(levy_stable.cdf(t, alpha, 0.0), dtype=np.float64)


def alpha_norm(w: np.ndarray, alpha: float) -> float:
    """‖w‖_α = (Σ_j |w_j|^α)^(1/α): the scale of w·z for i.i.d. standard α-stable z."""
    w = np.abs(np.asarray(w, dtype=np.float64))
    return float((w**alpha).sum() ** (1.0 / alpha))


def linear_class_accuracy(
    w: np.ndarray, b: float, mu: float | np.ndarray, sigma: float | np.ndarray, alpha: float,
    class_scale: tuple[float, float] = (1.0, 1.0), eps: float = 0.0, norm: str = "linf",
) -> np.ndarray:
    """Exact per-class accuracy [P(correct | y=0), P(correct | y=1)] of the rule "class 1 iff
    w·x + b > 0" on the stable mixture, F_α((w·μ + s_y·b − ε‖w‖_*)/(c_y‖w ⊙ σ‖_α)); ``mu`` and
    ``sigma`` are scalars (μ·1, σ·1) or vectors; ``eps`` > 0: under the worst perturbation."""
    w = np.asarray(w, dtype=np.float64).ravel()
    mu_v = np.broadcast_to(np.asarray(mu, dtype=np.float64), w.shape)
    sigma_v = np.broadcast_to(np.asarray(sigma, dtype=np.float64), w.shape)
    dual = np.abs(w).sum() if norm == "linf" else float(np.sqrt((w**2).sum()))
    signs = np.array([-1.0, 1.0])
    margins = float(w @ mu_v) + signs * b - eps * dual
    scale = np.asarray(class_scale, dtype=np.float64) * alpha_norm(w * sigma_v, alpha)
    if not np.all(scale > 0.0):
        return (margins > 0).astype(np.float64)
    return stable_cdf(margins / scale, alpha)


def best_linear_accuracy(mu: float, sigma: float, alpha: float, d: int,
                         eps: float = 0.0, norm: str = "l2") -> float:
    """Accuracy of w = 1, b = 0 on the balanced mixture, under the worst ε-perturbation if
    eps > 0 (the margin μd shrinks by ε‖1‖_*: ε√d for ℓ2, εd for ℓ∞)."""
    dual = math.sqrt(d) if norm == "l2" else float(d)
    return float(stable_cdf((mu * d - eps * dual) / (sigma * d ** (1.0 / alpha)), alpha))


# ------------------------------------------------------------------------------------------
# the mixture's parameters: scalars, vectors or profiles


class ProfileRun(BaseModel):
    """``count`` coordinates with the same ``value``."""

    model_config = ConfigDict(extra="forbid")

    value: float
    count: int = Field(ge=1)


#: a scalar, a vector of d values, or a profile of runs
Profile = float | list[float] | list[ProfileRun]


def profile_vector(value: Profile, d: int, what: str) -> np.ndarray:
    """The (d,) vector of a scalar, a vector or a profile ``[{value, count}, …]``."""
    if isinstance(value, int | float):
        return np.full(d, float(value))
    if value and isinstance(value[0], ProfileRun):
        vec = np.concatenate([np.full(r.count, r.value) for r in value])  # type: ignore[union-attr]
    else:
        vec = np.asarray(value, dtype=np.float64)
    if len(vec) != d:
        raise ValueError(f"{what} has {len(vec)} coordinates but d is {d}")
    return vec


def _length(value: Profile | None) -> int | None:
    """Number of coordinates a vector or profile gives (None for a scalar)."""
    if value is None or isinstance(value, int | float):
        return None
    if value and isinstance(value[0], ProfileRun):
        return sum(r.count for r in value)  # type: ignore[union-attr]
    return len(value)


def describe_vector(v: np.ndarray) -> str:
    """Runs of equal values: ``"4×20, 1×80"`` (a constant vector: its value)."""
    runs: list[list[float]] = []
    for x in np.asarray(v, dtype=np.float64):
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([float(x), 1])
    if len(runs) == 1:
        return f"{runs[0][0]:g}"
    if len(runs) > 6:
        return f"{len(v)} values from {min(v):g} to {max(v):g}"
    return ", ".join(f"{val:g}×{int(n)}" for val, n in runs)


@dataclass(frozen=True)
class Mixture:
    """The population: class y has mean s_y·μ and noise c_y·σ ⊙ z (z standard α-stable)."""

    alpha: float
    mu: np.ndarray
    sigma: np.ndarray
    class_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def d(self) -> int:
        return len(self.mu)

    def class_accuracy(self, w: np.ndarray, b: float, eps: float = 0.0, norm: str = "linf"
                       ) -> np.ndarray:
        """Exact [P(correct | 0), P(correct | 1)] of "class 1 iff w·x + b > 0"."""
        return linear_class_accuracy(w, b, self.mu, self.sigma, self.alpha, self.class_scale,
                                     eps, norm)

    def describe(self) -> str:
        scale = "" if self.class_scale == (1.0, 1.0) else (
            f", class scale {self.class_scale[0]:g}, {self.class_scale[1]:g}")
        return (f"{ALPHA_NAMES.get(self.alpha, f'alpha={self.alpha:g}')} (α = {self.alpha:g}), "
                f"d = {self.d}, μ = {describe_vector(self.mu)}, σ = "
                f"{describe_vector(self.sigma)}{scale}")

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "d": self.d, "mu": self.mu.tolist(),
                "sigma": self.sigma.tolist(), "class_scale": list(self.class_scale),
                "description": self.describe()}


# ------------------------------------------------------------------------------------------
# the stable mixture dataset


class StableMixtureParams(BaseModel):
    """``data.params`` of ``stable-mixture``."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(2.0, gt=0.0, le=2.0, description="stability index (2, 1.5, 1)")
    d: int = Field(100, ge=1, le=100_000, description="input dimension (default: the length "
                   "of a vector μ or σ, else 100)")
    mu: Profile | None = Field(None, description="class means ±μ: a scalar (μ·1), d values or "
                               "a profile [{value, count}, …] (default per α)")
    sigma: Profile | None = Field(None, description="noise scale σ per coordinate: scalar, d "
                                  "values or a profile (default per α)")
    class_scale: tuple[float, float] = Field(
        (1.0, 1.0), description="noise scale c_y of class 0 and class 1")
    n_major: int = Field(4000, ge=1, description="majority training samples N")
    n_val_major: int = Field(1000, ge=1, description="majority validation samples")
    n_test: int = Field(1000, ge=1, description="test samples of the majority class")
    ratio: float = Field(1.0, ge=1.0, description="imbalance ratio R = n_0 / n_1")
    seed: int = Field(0, ge=0, description="seed of the draw")

    @model_validator(mode="after")
    def _defaults(self) -> StableMixtureParams:
        if self.mu is None or self.sigma is None:
            if self.alpha not in DEFAULT_MU_SIGMA:
                raise ValueError(
                    f"no default mu/sigma for alpha={self.alpha}; set data.params.mu and "
                    f"data.params.sigma (defaults exist for alpha 2, 1.5 and 1)")
            mu, sigma = DEFAULT_MU_SIGMA[self.alpha]
            object.__setattr__(self, "mu", self.mu if self.mu is not None else mu)
            object.__setattr__(self, "sigma", self.sigma if self.sigma is not None else sigma)
        if "d" not in self.model_fields_set:  # a vector or profile sets d
            lengths = {_length(v) for v in (self.mu, self.sigma)} - {None}
            if len(lengths) > 1:
                raise ValueError(f"mu and sigma have different lengths {sorted(lengths)}")
            if lengths:
                object.__setattr__(self, "d", lengths.pop())
        mix = self.mixture()
        if not np.all(mix.sigma > 0) or min(self.class_scale) <= 0:
            raise ValueError("sigma and class_scale must be > 0")
        if not np.any(mix.mu != 0):
            raise ValueError("mu must not be 0 (the two classes would coincide)")
        return self

    def mixture(self) -> Mixture:
        """The population these parameters describe."""
        return Mixture(self.alpha, profile_vector(self.mu, self.d, "mu"),  # type: ignore[arg-type]
                       profile_vector(self.sigma, self.d, "sigma"),  # type: ignore[arg-type]
                       (float(self.class_scale[0]), float(self.class_scale[1])))


def parse_params(model: type[BaseModel], params: dict[str, Any], where: str) -> Any:
    """Validate ``data.params`` with a one-line error naming the field."""
    try:
        return model(**params)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, where)) from None


def minority_size(n: int, ratio: float) -> int:
    """n/R rounded, at least 1."""
    return max(1, int(round(n / ratio)))


def _draw_class(p: StableMixtureParams, split: int, label: int, n: int) -> np.ndarray:
    """n samples of one class; split/label get their own random stream, so that sizes nest
    (the first n/R minority samples are the same for every R)."""
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, split, label]))
    z = sample_symmetric_stable(p.alpha, (n, p.d), rng)
    mix = p.mixture()
    sign = -1.0 if label == 0 else 1.0
    return sign * mix.mu + mix.class_scale[label] * mix.sigma * z


def _split(p: StableMixtureParams, split: int, n0: int, n1: int) -> ArrayData:
    x = np.concatenate([_draw_class(p, split, 0, n0), _draw_class(p, split, 1, n1)])
    y = np.concatenate([np.zeros(n0, np.int64), np.ones(n1, np.int64)])
    xt = torch.from_numpy(x.astype(np.float32)).reshape(n0 + n1, p.d, 1, 1)
    return ArrayData(xt, torch.from_numpy(y))


def make_stable_mixture(p: StableMixtureParams) -> DataBundle:
    """Train, validation and imbalanced test splits, and the balanced test set in
    ``extra['test_balanced']``. Inputs are shaped (n, d, 1, 1) and are not images: they are
    unbounded (``extra['bounded']`` is False), so attacks must not clip them to [0, 1]."""
    n1 = minority_size(p.n_major, p.ratio)
    train = _split(p, 0, p.n_major, n1)
    val = _split(p, 1, p.n_val_major, minority_size(p.n_val_major, p.ratio))
    test = _split(p, 2, p.n_test, minority_size(p.n_test, p.ratio))
    balanced = _split(p, 3, p.n_test, p.n_test)
    return DataBundle(
        "stable-mixture", train, val, test, 2, (0.0,) * p.d, (1.0,) * p.d, "none",
        ["0 (majority, mean -mu)", "1 (minority, mean +mu)"],
        extra={"test_balanced": balanced, "majority": 0, "ratio": p.ratio, "bounded": False,
               "alpha": p.alpha, "d": p.d, "mixture": p.mixture()},
    )


@DATASETS.register("stable-mixture")
def stable_mixture(cfg: Any) -> DataBundle:
    """Imbalanced two-class mixture ±μ + c_y·σ ⊙ (symmetric α-stable noise) in d = 100
    dimensions (AT-on-AD): Gaussian α=2, Holtsmark α=1.5, Cauchy α=1; data.params: alpha, d,
    mu and sigma (scalar, vector or profile), class_scale, n_major, n_val_major, n_test, ratio,
    seed."""
    return make_stable_mixture(parse_params(StableMixtureParams, dict(cfg.params), "data.params"))


# ------------------------------------------------------------------------------------------
# binary one-class-against-the-rest tasks


class BinaryTaskParams(BaseModel):
    """``data.params`` of the ``*-binary`` tasks."""

    model_config = ConfigDict(extra="forbid")

    one_class: int = Field(1, ge=0, description="original label that becomes class 0")
    majority: Literal["one", "rest"] = Field("one", description="which class has N samples")
    ratio: float = Field(1.0, ge=1.0, description="imbalance ratio R")
    n_major: int = Field(4000, ge=1, description="majority training samples N")
    n_val_major: int = Field(1000, ge=1, description="majority validation samples")
    n_test: int = Field(1000, ge=1, description="test samples of the majority class")
    seed: int = Field(0, ge=0, description="seed of the subsampling")


#: per base dataset: (one_class, majority, n_major, n_val_major, n_test, pool test with train)
BINARY_TASKS: dict[str, tuple[int, str, int, int, int, bool]] = {
    "mnist": (1, "one", 4000, 1000, 1000, False),
    "fashion-mnist": (1, "rest", 4000, 1000, 1000, False),
    "cifar10": (3, "one", 4000, 1000, 1000, False),
    "mnist5k": (1, "one", 250, 50, 200, True),  # 500 images of each digit in all
}


def _slice(pool: np.ndarray, start: int, size: int, n: int, what: str, fields: str
           ) -> np.ndarray:
    """The first n of the reserved block pool[start:start+size] (blocks do not depend on R)."""
    if start + size > len(pool):
        raise UserError(f"data.params.{fields}: {what} needs {start + size} images but only "
                        f"{len(pool)} are available; lower data.params.{fields}")
    return pool[start : start + n]


def _binary_split(data: ArrayData, idx0: np.ndarray, idx1: np.ndarray) -> ArrayData:
    idx = torch.from_numpy(np.concatenate([idx0, idx1]).astype(np.int64))
    y = torch.cat([torch.zeros(len(idx0), dtype=torch.long), torch.ones(len(idx1), dtype=torch.long)])
    return ArrayData(data.x[idx], y)


def make_binary_task(base: DataBundle, p: BinaryTaskParams, pooled: bool) -> DataBundle:
    """Class 0 = ``one_class``, class 1 = the rest, with N and N/R training samples (which class
    is the majority is ``p.majority``); validation drawn like training; balanced test (n_test,
    n_test) and imbalanced test (n_test, n_test/R, a subset of the balanced one).

    Each class's shuffled images are cut into fixed blocks of N (training), n_val_major
    (validation) and n_test (test) images, and a split takes the first N or N/R of its block,
    so every split nests across R (and each class needs N + n_val_major images for training).
    ``pooled``: the test block comes from the same pool (small datasets without a test split
    large enough)."""
    if p.one_class >= base.num_classes:
        raise UserError(f"data.params.one_class: {base.name} has classes 0..{base.num_classes - 1}")
    train_pool = base.train if len(base.val) == 0 else base.train.concat(base.val)
    test_pool = base.test
    if pooled:
        train_pool = test_pool = train_pool.concat(base.test)
    rng = np.random.default_rng(np.random.SeedSequence([p.seed, 7]))

    def by_class(d: ArrayData) -> list[np.ndarray]:
        y = d.y.numpy()
        return [rng.permutation(np.nonzero(y == p.one_class)[0]),
                rng.permutation(np.nonzero(y != p.one_class)[0])]

    major = 0 if p.majority == "one" else 1
    tr = by_class(train_pool)
    te = tr if pooled else by_class(test_pool)
    t0 = p.n_major + p.n_val_major if pooled else 0  # pooled: the test block follows
    train, val, test_b = [], [], []
    for c in (0, 1):
        def size(n: int, c: int = c) -> int:
            return n if c == major else minority_size(n, p.ratio)

        train.append(_slice(tr[c], 0, p.n_major, size(p.n_major), f"class {c} training",
                            "n_major"))
        val.append(_slice(tr[c], p.n_major, p.n_val_major, size(p.n_val_major),
                          f"class {c} training + validation", "n_major + n_val_major"))
        test_b.append(_slice(te[c], t0, p.n_test, p.n_test, f"class {c} test", "n_test"))
    n_minor = minority_size(p.n_test, p.ratio)
    imb = [t if c == major else t[:n_minor] for c, t in enumerate(test_b)]
    one_name = base.class_names[p.one_class] if base.class_names else str(p.one_class)
    return DataBundle(
        f"{base.name}-binary",
        _binary_split(train_pool, *train),
        _binary_split(train_pool, *val),
        _binary_split(test_pool, *imb),
        2, base.mean, base.std, "none", [one_name, f"not {one_name}"],
        extra={"test_balanced": _binary_split(test_pool, *test_b), "majority": major,
               "ratio": p.ratio, "bounded": True, "base": base.name},
    )


def _binary_loader(base_name: str) -> Any:
    one, majority, n_major, n_val, n_test, pooled = BINARY_TASKS[base_name]

    def load(cfg: Any) -> DataBundle:
        params = {"one_class": one, "majority": majority, "n_major": n_major,
                  "n_val_major": n_val, "n_test": n_test, **dict(cfg.params)}
        p = parse_params(BinaryTaskParams, params, "data.params")
        base = DATASETS.get(base_name)(cfg)
        return make_binary_task(base, p, pooled)

    load.__doc__ = (
        f"Binary task from {base_name}: original class {one} against the rest "
        f"({'the rest' if majority == 'rest' else f'class {one}'} is the majority, N={n_major}); "
        f"data.params: one_class, majority, ratio, n_major, n_val_major, n_test, seed."
    )
    return load


for _name in BINARY_TASKS:
    DATASETS.register(f"{_name}-binary")(_binary_loader(_name))
