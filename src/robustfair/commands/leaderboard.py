"""``robustfair leaderboard MODEL...``: several models, the same images and attack, one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import UserError
from ._common import echo_err, setup_logging


@click.command("leaderboard")
@click.argument("models", nargs=-1, required=True)
@click.option("--dataset", required=True, help="Dataset whose test split all models are "
                                                "evaluated on (see 'robustfair datasets').")
@click.option("--attack", "-a", default="autoattack", show_default=True,
              help="The robust attack of the table (clean is always evaluated too).")
@click.option("--eps", default=None, help="Budget ε, e.g. 8/255 (default: 8/255 for linf, 0.5 "
                                          "for l2).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True,
              help="Threat model; also the RobustBench leaderboard of robustbench:NAME models.")
@click.option("--n", "n", type=int, default=None,
              help="Evaluate N test images, the class-stratified subset of 'robustfair eval "
                   "--n' (default: all).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the attacks' random draws (per attack and batch).")
@click.option("--batch-size", type=int, default=500, show_default=True,
              help="Images attacked at once.")
@click.option("--baseline", default=None,
              help="The model that ρ is measured against (default: the first).")
@click.option("--model", "model_name", default=None,
              help="Architecture of the model files among MODELS (see 'robustfair models').")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("models"), show_default=True,
              help="RobustBench's model folder (weights in DIR/DATASET/THREAT/NAME.pt).")
@click.option("--data-root", default=None, help="Folder of the dataset files.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Setting of the model files, e.g. --set model.params.width=2.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("leaderboard"), show_default=True,
              help="Folder for leaderboard.md, .csv, .html and .json, and each model's "
                   "evaluation in MODEL/summary.json.")
@click.option("--quiet", "-q", is_flag=True, help="No progress; only the table.")
def command(models: tuple[str, ...], dataset: str, attack: str, eps: str | None, norm: str,
            n: int | None, seed: int, batch_size: int, baseline: str | None,
            model_name: str | None, model_dir: Path, data_root: str | None,
            overrides: tuple[str, ...], out: Path, quiet: bool) -> None:
    """Evaluate MODELS on the same images and write a per-class leaderboard.

    A MODEL is a run directory, robustbench:NAME (a RobustBench zoo model; needs the
    robustbench extra and its weights in --model-dir), or a model file (with --model)."""
    from ..attacks import build_attack
    from ..engine.protocol import evaluate_images
    from ..engine.subset import subset_indices
    from ..models.zoo import DEFAULT_EPS
    from ..report.leaderboard import Entry, Leaderboard, to_markdown, write_outputs
    from ..units import parse_eps

    setup_logging(quiet)
    # every input is checked and every model loaded before anything is attacked or written
    try:
        budget = float(parse_eps(eps)) if eps is not None else DEFAULT_EPS[norm]
    except (TypeError, ValueError):
        raise UserError(f"--eps {eps!r} is not a number or fraction (e.g. 8/255)") from None
    if not budget > 0:
        raise UserError(f"--eps must be positive (got {eps})")
    if n is not None and n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
    if attack.strip().lower() == "clean":
        raise UserError("--attack must be an attack (clean accuracy is always in the table), "
                        "e.g. -a autoattack or -a pgd20")
    labels = _labels(models)
    base = 0
    if baseline is not None:
        if baseline not in models and baseline not in labels:
            raise UserError(f"--baseline {baseline!r} is not among the models given")
        base = list(models).index(baseline) if baseline in models else labels.index(baseline)
    ov = ([f"data.root={data_root}"] if data_root else []) + list(overrides)
    targets = [_target(spec, dataset, norm, model_name, model_dir, ov) for spec in models]
    shas = set()
    for target, _ in targets:
        build_attack(attack, norm, bounded=target.data.bounded)  # refuses an unknown attack
        y = target.data.split("test").y
        idx = subset_indices(y, n)
        shas.add((len(y), tuple(idx.tolist()), tuple(y[idx].tolist())))
    if len(shas) > 1:
        raise UserError("the models' test images differ (runs with other data settings, e.g. "
                        "data.test_limit); give models evaluated on one test split")
    entries, names = [], []
    for (target, source), label in zip(targets, labels, strict=True):
        if not quiet:
            echo_err(f"== {label}")
        data = target.data
        res, _ = evaluate_images(
            target.model, data.split("test"), ["clean", attack], budget, norm, n=n, seed=seed,
            batch_size=batch_size, num_classes=data.num_classes, device=target.device,
            describe={"dataset": dataset, "split": "test", "model": label,
                      "class_names": data.class_names, "group_names": data.group_names},
            fingerprint=target.fingerprint, out_dir=out / _safe(label), quiet=quiet,
            bounded=data.bounded)
        entries.append(Entry(label, source, res.summary()))
        names = [str(c) for c in (data.class_names or range(data.num_classes))]
    shas = {e.summary["settings"]["subset"]["sha256"] for e in entries}
    if len(shas) > 1:
        raise UserError("the models' test images differ (runs with other data settings, e.g. "
                        "data.test_limit); give models evaluated on one test split")
    attack_row = [a for a in entries[0].summary["attacks"] if a != "clean"][-1]
    board = Leaderboard(entries, attack_row, base, names)
    board.compute_rho()
    paths = write_outputs(board, out)
    click.echo(to_markdown(board))
    click.echo(f"saved: {paths['markdown']}, {paths['csv']}, {paths['html']}, {paths['json']}")


def _labels(models: tuple[str, ...]) -> list[str]:
    labels = []
    for m in models:
        lbl = m.split(":", 1)[1] if m.startswith(("robustbench:", "rb:")) else Path(m).name
        if Path(m).suffix in (".pt", ".pth", ".safetensors"):
            lbl = Path(m).stem
        labels.append(lbl if lbl not in labels else f"{lbl}-{len(labels)}")
    return labels


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _target(spec: str, dataset: str, norm: str, model_name: str | None, model_dir: Path,
            overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    from .evaluate import load_model_file, load_run, load_zoo_target

    if spec.startswith(("robustbench:", "rb:")):
        name = spec.split(":", 1)[1]
        t = load_zoo_target(name, dataset, norm, model_dir, overrides)
        return t, {"source": "robustbench", "name": name, "threat": norm,
                   "sha256": t.fingerprint["sha256"]}
    path = Path(spec)
    if path.is_dir():
        t = load_run(path, overrides)
        if t.cfg.data.name != dataset:
            raise UserError(f"run {spec!r} was trained on {t.cfg.data.name!r}, not {dataset!r}; "
                            f"give runs of one dataset")
        return t, {"source": "run", "run": spec, "sha256": t.fingerprint.get("sha256")}
    if path.is_file():
        if not model_name:
            raise UserError(f"{spec!r} is a model file: give its architecture with --model NAME")
        t = load_model_file(path, model_name, dataset, overrides)
        return t, {"source": "file", "file": spec, "architecture": model_name,
                   "sha256": t.fingerprint["sha256"]}
    raise UserError(f"model {spec!r} not found: give a run directory, robustbench:NAME or a "
                    f"model file")
