"""``robustfair eval``: evaluate a run (or a model file) per class, AutoAttack included, or run
the sanity checks of the evaluation."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from ..attacks.autoattack import near_queries
from ..config import RunConfig, apply_override, build_config
from ..engine.protocol import STATE_FILE  # noqa: F401 - re-exported
from ..errors import UserError
from ._common import class_table, echo_err, setup_logging

log = logging.getLogger("robustfair.eval")



@click.command("eval")
@click.argument("run_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--attack", "-a", "attacks",
              help="Comma-separated attacks, e.g. pgd20,cw20,autoattack (also autoattack-plus, "
                   "autoattack-rand, apgd-ce, apgd-dlr, apgd-t, fab-t, square).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set eval.eps=8/255 or --set model.params.width=2.")
@click.option("--use", "which", type=click.Choice(["last", "best"]), default=None,
              help="Which checkpoint of the run (default: eval.checkpoint, 'last').")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Evaluate a model file instead of a run (RobustBench convention: inputs in "
                   "[0, 1], normalization inside); needs --model and --dataset.")
@click.option("--robustbench", "zoo_name", default=None, metavar="NAME",
              help="Evaluate a RobustBench zoo model, e.g. Carmon2019Unlabeled (needs "
                   "pip install 'robustfair[robustbench]' and its weights in --model-dir); "
                   "with --dataset and --threat.")
@click.option("--threat", type=click.Choice(["linf", "l2"]), default="linf",
              show_default=True, help="Threat model of the --robustbench model (its "
                                      "leaderboard); also the default --norm.")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("models"), show_default=True,
              help="RobustBench's model folder: weights in DIR/DATASET/THREAT/NAME.pt.")
@click.option("--model", "model_name", default=None, help="Architecture of --checkpoint.")
@click.option("--dataset", default=None, help="Dataset of --checkpoint (its test split).")
@click.option("--data-root", default=None, help="Folder of the dataset files.")
@click.option("--eps", default=None, help="Budget ε, e.g. 8/255 (default: the run's eval.eps, "
                                          "else its training ε; 8/255 for a file; "
                                          "RobustBench's 8/255 (linf) or 0.5 (l2) for "
                                          "--robustbench).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default=None,
              help="Threat model: linf (max pixel change) or l2 (Euclidean length of the "
                   "change); default: the run's eval.norm, else its training norm.")
@click.option("--n", "n", type=int, default=None,
              help="Evaluate N test images, a class-stratified subset (each class in "
                   "proportion to its size, fixed seed), the same in every command; default: "
                   "all (200 for --checks). The images are recorded in summary.json.")
@click.option("--batch-size", type=int, default=None,
              help="Images attacked at once (default: eval.batch_size, 500); smaller uses less "
                   "memory. Each batch is seeded from (seed, attack, batch number).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: RUN/eval, or STEM-eval beside the file).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted evaluation, keeping the attacks already done (the "
                   "settings and images must be the same).")
@click.option("--checks", "checks", is_flag=True,
              help="Run the sanity checks of the evaluation (gradient masking, randomness), "
                   "print a verdict for each and save them in OUT/checks.json; exit code 1 "
                   "when a check fails.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; only the "
                                                  "result.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def eval_cmd(run_dir: Path | None, attacks: str | None, overrides: tuple[str, ...],
             which: str | None, checkpoint: Path | None, zoo_name: str | None, threat: str,
             model_dir: Path, model_name: str | None,
             dataset: str | None, data_root: str | None, eps: str | None, norm: str | None,
             n: int | None, batch_size: int | None, out: Path | None, resume: bool,
             checks: bool, quiet: bool, as_json: bool) -> int:
    """Evaluate per class under attack (clean, PGD, CW, AutoAttack, ...) and add the result
    to the run's record: to eval/summary.json when the settings (checkpoint and its weights,
    images, ε, norm, seed) are those of the run's evaluation, else beside it in eval/KEY/summary.json; or, with
    --checks, check that the evaluation can be trusted.

    Cost, 1,000 MNIST-5k images with the SmallCNN on one CPU core: PGD-20 or CW-20 about 35 s
    each; AutoAttack (standard: 100 iterations, 9 target classes, Square with 5,000 queries)
    tens of minutes. Use --n for a quick look; the progress bar counts model passes."""
    from ..engine.distributed import world_from_env

    first = world_from_env()[0] == 0  # under torchrun only the first process draws and prints
    setup_logging(quiet or not first)
    quiet = quiet or not first
    ov = list(overrides) + _shortcuts(eps, norm, n, batch_size, data_root)
    if zoo_name is not None:
        if run_dir is not None or checkpoint is not None:
            raise UserError("give one of RUN_DIR, --checkpoint and --robustbench")
        target = load_zoo_target(zoo_name, dataset, threat, model_dir, ov, out, norm)
    else:
        target = _load_target(run_dir, checkpoint, model_name, dataset, ov, which, out)
    if checks:
        return _print_checks(target, quiet, as_json)
    summary, saved = _evaluate(target, attacks, resume, quiet)
    if not first:
        return 0
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render(summary, f"{target.label}: accuracy (%) per class"))
        click.echo(f"images: {images_line(summary)}")
        click.echo(f"saved: {saved}" + ("" if saved is None or saved.parent == target.out_dir
                                        else f" (beside {target.out_dir / 'summary.json'}, "
                                             f"which has other settings)"))
    return 0


def images_line(summary: dict[str, Any]) -> str:
    sub = summary.get("settings", {}).get("subset") or {}
    if not sub:
        return f"{summary.get('n')}"
    return (f"{sub['n']} of {sub['of']} {sub.get('split', '')} images, {sub['rule']}"
            + (f" (seed {sub['seed']})" if sub.get("seed") is not None else "")
            + f"; sha256 {sub['sha256'][:12]}")


def _shortcuts(eps: str | None, norm: str | None, n: int | None, batch_size: int | None,
               data_root: str | None) -> list[str]:
    ov = []
    if eps is not None:
        ov.append(f"eval.eps={eps!s}")
    if norm is not None:
        ov.append(f"eval.norm={norm}")
    if n is not None:
        ov.append(f"eval.n={n}")
    if batch_size is not None:
        ov.append(f"eval.batch_size={batch_size}")
    if data_root is not None:
        ov.append(f"data.root={data_root}")
    return ov


@dataclass
class Target:
    """What to evaluate: the model, its data and settings, and where results go."""

    cfg: RunConfig
    data: Any
    model: nn.Module
    device: torch.device
    out_dir: Path
    label: str
    run_dir: Path | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _load_target(run_dir: Path | None, checkpoint: Path | None, model_name: str | None,
                 dataset: str | None, overrides: list[str], which: str | None,
                 out: Path | None) -> Target:
    if checkpoint is not None:
        if run_dir is not None:
            raise UserError("give either RUN_DIR or --checkpoint, not both")
        if not model_name or not dataset:
            raise UserError("--checkpoint needs --model NAME and --dataset NAME (see "
                            "'robustfair models' and 'robustfair datasets')")
        return load_model_file(checkpoint, model_name, dataset, overrides, out)
    if run_dir is None:
        raise UserError("give a run directory (RUN_DIR) or --checkpoint FILE --model NAME "
                        "--dataset NAME")
    return load_run(run_dir, overrides, which, out)


def load_run(run_dir: Path, overrides: list[str] | None = None, which: str | None = None,
             out: Path | None = None) -> Target:
    """The model of a training run (EMA or averaged weights when the run evaluates those)."""
    import yaml

    from ..data import load_data
    from ..engine.integrity import verify_checkpoint
    from ..engine.io import load_checkpoint, sha256_file
    from ..engine.protocol import trainer_eval_model
    from ..engine.trainer import Trainer

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give the "
                        f"folder that 'robustfair train' created")
    raw = yaml.safe_load(cfg_file.read_text())
    for ov in overrides or []:
        apply_override(raw, ov)
    cfg = build_config(raw)
    which = which or cfg.eval.checkpoint
    ckpt = run_dir / "checkpoints" / f"{which}.pt"
    if not ckpt.exists():
        raise UserError(f"{str(ckpt)!r} not found; train the run first (or use --use last)")
    if which == "best" and not _validated(run_dir):
        log.warning("warning: %s never validated (validation.every = 0 or no validation split), "
                    "so best.pt is the last epoch's checkpoint, the same as --use last; train "
                    "with --set validation.every=1 to pick the best epoch", run_dir)
    data = load_data(cfg.data)
    trainer = Trainer(cfg, run_dir, data=data, quiet=True)
    verify_checkpoint(ckpt)
    trainer.load_state_dict(load_checkpoint(ckpt, map_location=trainer.device))
    model, weights = trainer_eval_model(trainer)
    model.eval()
    return Target(cfg, data, model, trainer.device, out or run_dir / "eval", str(run_dir),
                  run_dir, {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt),
                            "weights": weights})


def _validated(run_dir: Path) -> bool:
    """Whether any epoch of the run's ``log.jsonl`` holds validation results."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return True  # nothing to tell
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("val"):
                return True
        except (ValueError, AttributeError):
            continue
    return False


def load_model_file(path: Path, model_name: str, dataset: str, overrides: list[str] | None = None,
                    out: Path | None = None) -> Target:
    """A model file in the RobustBench convention: a state dict, plain or under 'state_dict'
    (or a robustfair checkpoint), ``module.``/``model.`` prefixes stripped, loaded with
    ``weights_only``. Normalization buffers found in the file (``mu``/``sigma`` or
    ``mean``/``std``) go into the model's input layer; without them the inputs reach the network
    in [0, 1] unchanged."""
    from ..data import load_data
    from ..engine.io import load_checkpoint, sha256_file
    from ..engine.trainer import resolve_device

    raw: dict[str, Any] = {"name": path.stem, "data": {"name": dataset},
                           "model": {"name": model_name}}
    for ov in overrides or []:
        apply_override(raw, ov)
    cfg = build_config(raw)
    device = resolve_device(cfg.device)
    data = load_data(cfg.data)
    state = model_state_dict(load_checkpoint(path, map_location="cpu"))
    model = build_from_state(state, cfg, data).to(device).eval()
    return Target(cfg, data, model, device, out or path.parent / f"{path.stem}-eval", str(path),
                  None, {"checkpoint": str(path), "sha256": sha256_file(path),
                         "weights": "as saved"})


def load_zoo_target(name: str, dataset: str | None, threat: str, model_dir: Path,
                    overrides: list[str] | None = None, out: Path | None = None,
                    norm_given: str | None = None) -> Target:
    """A RobustBench zoo model (see :mod:`robustfair.models.zoo`) on ``dataset``'s test split,
    at the leaderboard's ε and norm unless ``--eps``/``--norm`` say otherwise."""
    from ..data import load_data
    from ..engine.io import sha256_file
    from ..engine.trainer import resolve_device
    from ..models.zoo import DEFAULT_EPS, load_zoo_model

    if not dataset:
        raise UserError("--robustbench needs --dataset (cifar10 or cifar100)")
    if dataset == "imagenet":
        raise UserError("robustfair has no ImageNet loader; --robustbench takes --dataset "
                        "cifar10 or cifar100")
    if norm_given is not None and norm_given != threat:
        raise UserError(f"--norm {norm_given} disagrees with --threat {threat}: a RobustBench "
                        f"model is evaluated in its own threat model; give --threat {norm_given}")
    raw: dict[str, Any] = {"name": name, "data": {"name": dataset},
                           "eval": {"eps": DEFAULT_EPS.get(threat, 0.0),
                                    "norm": threat if threat in DEFAULT_EPS else "linf"}}
    for ov in overrides or []:
        apply_override(raw, ov)
    cfg = build_config(raw)
    model, path = load_zoo_model(name, dataset, threat, model_dir)
    device = resolve_device(cfg.device)
    data = load_data(cfg.data)
    return Target(cfg, data, model.to(device), device, out or Path(f"{name}-eval"), name, None,
                  {"checkpoint": str(path), "sha256": sha256_file(path),
                   "model": f"robustbench:{name}", "threat": threat, "weights": "as saved"})


_NORM_KEYS = (("mu", "sigma"), ("mean", "std"))


def model_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a model file (see :func:`robustfair.models.loading.state_dict_of`)."""
    from ..models.loading import state_dict_of

    return state_dict_of(obj)


def build_from_state(state: dict[str, torch.Tensor], cfg: RunConfig, data: Any) -> nn.Module:
    """Build ``cfg.model`` for ``data`` and load ``state`` into it (whole classifier, or the
    bare network with the file's normalization)."""
    from ..models import build_model

    net_only = not any(k.startswith(("net.", "normalize.")) for k in state)
    mean, std = data.mean, data.std
    if net_only:
        state = dict(state)
        mean, std = (0.0,) * data.in_channels, (1.0,) * data.in_channels
        for km, ks in _NORM_KEYS:
            if km in state and ks in state:
                mean = tuple(float(v) for v in state.pop(km).flatten())
                std = tuple(float(v) for v in state.pop(ks).flatten())
                break
        else:
            log.info("no normalization in the file: images in [0, 1] reach the network as is")
    model = build_model(cfg.model.name, data.in_channels, data.num_classes, data.image_size,
                        mean, std, **cfg.model.params)
    target = model.net if net_only else model
    from ..models.loading import load_strict

    load_strict(target, state, f"model {cfg.model.name!r}",
                "check --model and --set model.params.KEY=VALUE")
    return model


def _evaluate(target: Target, attacks: str | None, resume: bool,
              quiet: bool) -> tuple[dict[str, Any], Path | None]:
    cfg = target.cfg
    if attacks:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(
            update={"attacks": type(cfg.eval).model_validate({"attacks": attacks}).attacks})})
    return evaluate_target(target, cfg, resume, quiet)


def evaluate_target(target: Target, cfg: RunConfig, resume: bool = False,
                    quiet: bool = False) -> tuple[dict[str, Any], Path | None]:
    """The evaluation of training's end (one routine, :mod:`robustfair.engine.protocol`):
    staged, resumable, on the class-stratified subset; added to the record in ``out_dir``.
    Returns the summary of this evaluation and the ``summary.json`` it was added to."""
    from ..engine.protocol import evaluate_split

    res, saved = evaluate_split(target.model, target.data, cfg, target.out_dir,
                                device=target.device, fingerprint=target.fingerprint,
                                resume=resume, quiet=quiet)
    return res.summary(), saved


def evaluate_run(run_dir: Path, attacks: str | None = None, overrides: list[str] | None = None,
                 which: str | None = None, quiet: bool = False,
                 resume: bool = False) -> dict[str, Any]:
    """Evaluate a run with its ``eval`` settings (and ``attacks`` if given); return the summary
    of this evaluation (the run's record keeps every evaluation, see engine/record.py)."""
    return _evaluate(load_run(run_dir, overrides, which), attacks, resume, quiet)[0]


def render(summary: dict[str, Any], title: str) -> str:
    """The per-class table, the per-stage tables of each ensemble, and the confusion matrix
    under the last attack."""
    names = summary.get("settings", {}).get("class_names") or None
    parts = [class_table(_for_display(summary), names, title)]
    if "worst_case" in summary:
        parts.append("worst-case: per sample, the worst over " +
                     ", ".join(summary["worst_case"]["over"]))
    for parent, stages in summary.get("stages", {}).items():
        cols: dict[str, Any] = {"clean": summary["attacks"]["clean"]}
        for i, (stage, s) in enumerate(stages.items()):
            cols[stage if i == 0 else f"+{stage}"] = s
        table = {"attacks": cols, "num_classes": summary["num_classes"], "n": summary["n"]}
        parts.append(class_table(table, names, f"{parent}: robust accuracy (%) after each "
                                               f"stage, cumulative (the last column is the "
                                               f"per-sample worst case over the ensemble)"))
    adv = [a for a in summary["attacks"] if a != "clean"]
    conf = summary.get("confusion", {})
    if adv and adv[-1] in conf and summary["num_classes"] <= 20:
        parts.append(confusion_table(conf[adv[-1]], names, adv[-1]))
    return "\n\n".join(parts)


def _for_display(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with the parameter-free attacks (APGD, FAB, Square, AutoAttack) described by
    their protocol (iterations or queries, seed) instead of a PGD step size."""
    settings = dict(summary.get("settings", {}))
    stages = settings.get("stages", {})
    shown = []
    for a in settings.get("attacks", []):
        if "steps" in a and "step_size" not in a:
            if "version" in a:
                comps = ", ".join(stages.get(a["attack"], []))
                queries = f"Square {a['n_queries']} queries"
                if a["version"] == "fast" and not a.get("attacks") and "fast_queries" in a:
                    queries += (f" where the logit gradients vanish, "
                                f"{near_queries(a)} on the other points "
                                f"within {a.get('near', 1.0):g}·ε of a linearised boundary")
                text = (f"{a['attack']} ({a['version'] if not a.get('attacks') else 'custom'}: "
                        f"{comps}; {a['steps']} iterations, {queries}, seed {a['seed']})")
            else:
                text = f"{a['attack']} ({a['steps']} iterations, restarts {a.get('restarts', 1)})"
            a = {"attack": text}
        elif "n_queries" in a and "steps" not in a:  # Square
            a = {"attack": f"{a['attack']} ({a['n_queries']} queries, seed {a.get('seed')})"}
        shown.append(a)
    settings["attacks"] = shown
    return {**summary, "settings": settings}


def confusion_table(matrix: list[list[int]], names: list[str] | None, attack: str) -> str:
    """Rows: true class; columns: predicted class under ``attack``."""
    c = len(matrix)
    labels = [str(v) for v in (names or range(c))][:c]
    w = max(5, *(len(lbl) for lbl in labels), *(len(str(v)) for row in matrix for v in row))
    lines = [f"confusion under {attack} (rows: true class, columns: predicted)",
             " " * w + " " + " ".join(f"{lbl:>{w}}" for lbl in labels)]
    for lbl, row in zip(labels, matrix, strict=True):
        lines.append(f"{lbl:>{w}} " + " ".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


def _print_checks(target: Target, quiet: bool, as_json: bool) -> int:
    """Run the sanity checks on the class-stratified subset (200 images unless --n), print each
    verdict as it comes and save them all in ``OUT/checks.json`` (the report shows them)."""
    from ..engine.checks import default_checks, run_checks
    from ..engine.io import atomic_write_json
    from ..engine.protocol import eval_eps_norm, package_versions
    from ..engine.subset import eval_subset

    cfg = target.cfg
    split, subset = eval_subset(target.data.split(cfg.eval.split), cfg.eval.n or 200,
                                name=cfg.eval.split)
    x = split.images().to(target.device)
    y = split.y.to(target.device)
    eps, norm = eval_eps_norm(cfg)
    if not as_json:
        click.echo(f"{target.label}: sanity checks on {len(y)} images, eps {eps:.4g} ({norm})")
    results = []
    bounded = target.data.bounded
    for name in default_checks(bounded):  # Square and APGD work inside the [0, 1] box only
        if not quiet and not as_json:
            echo_err(f"running {name} ...")
        (r,) = run_checks(target.model, x, y, eps, norm, [name], False, bounded, cfg.seed)
        results.append(r)
        if not as_json:
            click.echo(f"{'PASS' if r.passed else 'FAIL'}  {r.name:<19} {r.verdict}")
            if not r.passed:
                click.echo(f"      fix: {r.fix}")
    bad = sum(not r.passed for r in results)
    record = {"settings": {"eps": eps, "norm": norm, "n": len(y), "subset": subset,
                           "dataset": cfg.data.name, "seed": cfg.seed,
                           "versions": package_versions(target.device),
                           **target.fingerprint},
              "passed": len(results) - bad, "failed": bad,
              "checks": [r.as_dict() for r in results]}
    atomic_write_json(target.out_dir / "checks.json", record)
    if as_json:
        click.echo(json.dumps(record, indent=2))
    else:
        click.echo(f"{len(results) - bad} passed, {bad} failed")
        click.echo(f"saved: {target.out_dir / 'checks.json'}")
    return 1 if bad else 0


command = eval_cmd
