"""Every registry member is exercised: each model builds, runs forward and backward and keeps
normalization inside; each objective, budget, weights, policy and sampler trains through the
engine in at least one shipped reduced recipe (chosen here to cover every member)."""

from __future__ import annotations

import pytest
import torch

from robustfair.budgets import BUDGETS
from robustfair.commands.run import train_run
from robustfair.config import load_config, load_recipe_dict, recipe_names
from robustfair.data import DATASETS
from robustfair.errors import UserError
from robustfair.models import MODELS, build_model
from robustfair.objectives import OBJECTIVES
from robustfair.policies import POLICIES
from robustfair.samplers import SAMPLERS
from robustfair.weights import WEIGHTS

EMBEDDED = {"digits", "mnist5k", "mnist5k-groups", "mnist5k-binary", "stable-mixture",
            "fairbatch-synthetic"}
PARTS = {"objective": OBJECTIVES, "budget": BUDGETS, "weights": WEIGHTS, "policy": POLICIES,
         "sampler": SAMPLERS}


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_backpropagates(name):
    size = 8 if name in {"linear", "mlp", "smallcnn"} else 32
    torch.manual_seed(0)
    m = build_model(name, 3, 7, size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.rand(2, 3, size, size, requires_grad=True)
    m.train()
    out = m(x)
    assert out.shape == (2, 7)
    torch.nn.functional.cross_entropy(out, torch.tensor([1, 4])).backward()
    assert x.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # normalization is a layer inside the model: the buffers are in its state dict
    assert "normalize.mean" in m.state_dict()


def _members(raw: dict) -> set[tuple[str, str]]:
    method = raw.get("method", {})
    out = set()
    for part in PARTS:
        spec = method.get(part, {"name": "none" if part == "policy" else "uniform"})
        out.add((part, spec if isinstance(spec, str) else spec.get("name")))
    return out


def _covering_recipes() -> list[str]:
    """The fewest embedded-data recipes (greedy) that together use every registered member."""
    cands = {}
    for r in recipe_names():
        raw = load_recipe_dict(r)
        if raw.get("data", {}).get("name", "mnist5k") in EMBEDDED and "model" in raw:
            cands[r] = _members(raw)
    chosen, covered = [], set()
    while True:
        best = max(cands, key=lambda r: len(cands[r] - covered), default=None)
        if best is None or not cands[best] - covered:
            return chosen
        chosen.append(best)
        covered |= cands.pop(best)


COVER = _covering_recipes()


def test_every_member_is_covered_by_a_tested_recipe():
    covered = set().union(*(_members(load_recipe_dict(r)) for r in COVER))
    missing = {(p, n) for p, reg in PARTS.items() for n in reg.names()} - covered
    # members that only make sense with special data are tested in their own files
    missing -= {("weights", "classwise"), ("budget", "classwise"), ("sampler", "balanced"),
                ("objective", "dkl")}
    assert not missing, f"no reduced recipe uses {sorted(missing)}"


@pytest.mark.parametrize("recipe", COVER)
def test_recipe_trains_through_the_engine(tmp_path, recipe):
    cfg = load_config(recipe=recipe, overrides=[
        f"output_dir={tmp_path}", "train.epochs=2", "data.train_limit=192", "attack.steps=2",
        "validation.n=48", "eval.attacks=[clean, fgsm]", "eval.n=64", "logging.progress=false",
        "train.batch_size=32"])
    path, summary = train_run(cfg, quiet=True)
    assert summary["attacks"]["clean"]["avg"] >= 0
    assert (path / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("part,spec", [
    ("budget", {"name": "classwise", "scale": [1.0] * 9 + [0.5]}),
    ("weights", {"name": "classwise", "inverse_frequency": True}),
    ("sampler", {"name": "balanced"}),
    ("objective", {"name": "dkl"}),
])
def test_static_parts_train(tmp_path, part, spec):
    cfg = load_config(recipe="mnist5k-trades", overrides=[
        f"output_dir={tmp_path}", "data.name=digits", "train.epochs=1", "attack.steps=2",
        "validation.n=32", "eval.attacks=[clean]", "logging.progress=false",
        f"method.{part}={spec}"])
    train_run(cfg, quiet=True)


def test_wrong_length_classwise_budget_is_a_user_error(tmp_path):
    cfg = load_config(recipe="mnist5k-trades", overrides=[
        f"output_dir={tmp_path}", "data.name=digits", "method.budget={name: classwise, "
        "scale: [1, 2]}"])
    with pytest.raises(UserError, match="one per class"):
        train_run(cfg, quiet=True)
    assert not (tmp_path / "mnist5k-trades").exists()


@pytest.mark.parametrize("name", sorted(set(DATASETS.names()) - EMBEDDED))
def test_disk_datasets_without_root_explain_the_fix(name):
    from robustfair.config import DataConfig
    from robustfair.data import load_data

    with pytest.raises(UserError, match="data.root"):
        load_data(DataConfig(name=name))
