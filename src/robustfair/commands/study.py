"""``robustfair study``: grids of small training runs and their analysis.

``robustfair study disparity --dataset stable-mixture --alpha 2`` runs the AT-on-AD accuracy
disparity study (Hu et al., ICML 2023) and writes Figure 1's two rows as PNG and JSON;
``--preset figure1`` uses a mixture on which both rows show."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..config import apply_override
from ..errors import Interrupted, UserError
from ._common import setup_logging


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not vals:
        raise UserError(f"{what}: give at least one value")
    return vals


def _default_output(dataset: str, alpha: float | None, model: str, preset: str) -> Path:
    tag = f"-alpha{alpha:g}" if dataset == "stable-mixture" else ""
    tag += f"-{preset}" if preset != "official" else ""
    return Path("runs") / f"study-disparity-{dataset}{tag}-{model}"


def _study_raw(opts: dict[str, Any]) -> dict[str, Any]:
    """Preset of the dataset, then the command-line options, then ``--set`` overrides."""
    from ..studies.presets import study_preset

    _check_dataset(opts)
    raw = study_preset(opts["dataset"], opts["alpha"], opts["preset"])
    if opts["alpha"] is not None and opts["dataset"] != "stable-mixture":
        raise UserError("--alpha applies to --dataset stable-mixture only")
    train = raw.setdefault("train", {})
    if opts["model"]:
        raw["model"] = opts["model"]
        if opts["model"] != "mlp":
            raw.pop("model_params", None)
    if opts["norms"]:
        raw["norms"] = [v.strip() for v in opts["norms"].split(",") if v.strip()]
    eps = raw.setdefault("eps", {})
    for norm in ("l2", "linf"):
        vals = _floats(opts[f"eps_{norm}"], f"--eps-{norm}")
        if vals is not None:
            eps[norm] = vals
    for key, opt in (("ratios", "ratios"), ("lrs_standard", "lrs"), ("lrs_robust", "lrs")):
        vals = _floats(opts[opt], f"--{opt}")
        if vals is not None:
            raw[key] = vals
    seeds = _floats(opts["seeds"], "--seeds")
    if seeds is not None:
        raw["seeds"] = [int(s) for s in seeds]
    for key in ("epochs", "patience", "batch_size", "optimizer", "attack"):
        if opts[key] is not None:
            train[key] = opts[key]
    if opts["accumulate_attack_grads"]:
        train["accumulate_attack_grads"] = True
    if opts["selection"] is not None:
        train["selection"] = opts["selection"]
    if opts["min_epochs"] is not None:
        train["min_epochs"] = opts["min_epochs"]
    if opts["fixed_data"]:
        raw["fixed_data"] = True
    if opts["data_root"]:
        raw["data_root"] = opts["data_root"]
    raw["device"] = opts["device"]
    for ov in opts["overrides"]:
        apply_override(raw, ov)
    return raw


def _check_dataset(opts: dict[str, Any]) -> None:
    """One-line errors for a dataset the study does not know and an α without its ε grid."""
    from ..data.stable_mixture import ALPHA_NAMES
    from ..studies.presets import preset_names

    dataset, alpha = opts["dataset"], opts["alpha"]
    if dataset not in preset_names():
        from ..data import DATASETS

        if dataset not in DATASETS:
            raise UserError(f"--dataset {dataset!r}: unknown; the study runs on "
                            f"{', '.join(preset_names())}")
    has_grid = opts["eps_l2"] is not None and opts["eps_linf"] is not None
    if dataset == "stable-mixture" and alpha is not None and float(alpha) not in ALPHA_NAMES \
            and not has_grid:
        known = ", ".join(f"{a:g}" for a in sorted(ALPHA_NAMES))
        raise UserError(f"--alpha {alpha:g}: the paper's ε grids exist for α = {known}; choose "
                        f"one, or give the grids with --eps-l2 and --eps-linf")


@click.group("study")
def study() -> None:
    """Grids of small training runs and their analysis (see 'robustfair study disparity -h')."""


@study.command("disparity")
@click.option("--dataset", default="stable-mixture", show_default=True,
              help="stable-mixture, or a binary task: mnist5k-binary, mnist-binary, "
                   "fashion-mnist-binary, cifar10-binary.")
@click.option("--preset", default="official", show_default=True,
              help="official: the official grids on the scalar mixture ±mu·1; figure1: a "
                   "stable mixture whose robust direction differs from the best one, so both "
                   "rows of Figure 1 show (stable-mixture only).")
@click.option("--alpha", type=float, default=None,
              help="Stability index of stable-mixture: 2 Gaussian (default), 1.5 Holtsmark, 1 Cauchy.")
@click.option("--model", default=None, help="linear, mlp or vgg11_bn (default: the preset's).")
@click.option("--norms", default=None, help="Comma-separated: l2,linf (default both).")
@click.option("--eps-l2", default=None, help="ℓ2 ε grid, e.g. 5,3.75,2.5 (default: the paper's).")
@click.option("--eps-linf", default=None, help="ℓ∞ ε grid, e.g. 1,0.75,0.5 (default: the paper's).")
@click.option("--ratios", default=None, help="Imbalance ratios R, e.g. 1,2,5,10,20.")
@click.option("--seeds", default=None, help="Seeds, e.g. 2,22,42,62,82.")
@click.option("--lrs", default=None, help="Learning-rate grid for every cell (selected by clean "
                                          "validation loss).")
@click.option("--epochs", type=int, default=None, help="Most epochs per run (default 500).")
@click.option("--patience", type=int, default=None, help="Early-stopping patience (default 50).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default 64).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None)
@click.option("--attack", default=None, help="auto (closed form for linear models, PGD "
                                             "otherwise), closed-form, fgsm or pgdN.")
@click.option("--selection", type=click.Choice(["clean", "robust"]), default=None,
              help="Validation loss that selects the epoch and learning rate: clean (official, "
                   "default) or robust (under the training attack).")
@click.option("--min-epochs", type=int, default=None,
              help="Epochs before a model may be selected (default 0, official).")
@click.option("--accumulate-attack-grads", is_flag=True,
              help="Reproduce the official update (attack gradients leak into the step).")
@click.option("--fixed-data", is_flag=True, help="One data draw for all seeds (official files).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a study setting, e.g. --set data_params.mu=3 (repeatable).")
@click.option("--data-root", default=None, help="Folder of the standard dataset files.")
@click.option("--output-dir", "-o", type=click.Path(path_type=Path), default=None,
              help="Output folder (default runs/study-disparity-DATASET...).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="Parallel worker processes.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--force", is_flag=True, help="Recompute every cell (ignore cached cells).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def disparity(**opts: Any) -> None:
    """Standard vs adversarial training over norm × ε × R × seed: the gap of accuracy disparity
    and the gap of standard accuracy (AT-on-AD, Figure 1), as PNG and JSON. Cached per cell:
    run the same command again to resume."""
    from ..studies.disparity import build_study_config, results_table, run_disparity_study

    setup_logging(opts["quiet"])
    if opts["workers"] < 1:
        raise UserError("--workers: give 1 or more")
    cfg = build_study_config(_study_raw(opts))
    out = opts["output_dir"] or _default_output(cfg.dataset, cfg.data_params.get("alpha"),
                                                cfg.model, cfg.preset)
    t0 = time.perf_counter()
    try:
        results = run_disparity_study(cfg, out, workers=opts["workers"], quiet=opts["quiet"],
                                      force=opts["force"])
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; finished cells are kept in {out}/cells and the "
                          f"workers are stopped — run the same command again to continue"
                          ) from None
    click.echo(results_table(results))
    figs = ", ".join(results["figures"].values())
    click.echo(f"results: {out / 'results.json'}; figures: {figs}  "
               f"({time.perf_counter() - t0:.0f} s)")


command = study
