"""The Python API's evaluation measures what it says: unbounded datasets, the user's groups, one
record per model, stochastic attacks seeded from the run seed, and tables that say which images
and which attack settings."""

from __future__ import annotations

import json

import pytest
import torch

import robustfair as rf
from robustfair.attacks import apgd as apgd_mod
from robustfair.attacks import build_attack
from robustfair.attacks import square as square_mod
from robustfair.attacks.autoattack import AutoAttack
from robustfair.attacks.square import Square
from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_unbounded_dataset_by_name_and_as_tensors():
    bundle = load_data(DataConfig(name="fairbatch-synthetic"))
    torch.manual_seed(0)
    m = build_model("mlp", bundle.in_channels, bundle.num_classes, bundle.image_size,
                    bundle.mean, bundle.std, hidden=[8]).eval()
    res = rf.evaluate(m, "fairbatch-synthetic", eps=0.1, attacks=["clean", "pgd5"], n=60)
    assert res.summary()["settings"]["attacks"][1]["clip"] is False
    x, y = bundle.test.images()[:60], bundle.test.y[:60]
    assert float(x.min()) < 0  # not images: only bounded=False may take them
    by_tensor = rf.evaluate(m, x, y, eps=0.1, attacks=["clean", "pgd5"], bounded=False)
    assert 0 <= by_tensor.accuracy("pgd5") <= by_tensor.accuracy("clean")


def test_a_loader_of_pairs_keeps_the_groups_given(trained_mlp, digits):
    x, y = digits.test.images()[:80], digits.test.y[:80]
    g = torch.arange(80) % 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    res = rf.evaluate(trained_mlp, loader, eps=0.1, attacks=["clean"], groups=g)
    assert res.result.groups is not None and torch.equal(res.result.groups, g)


def test_two_models_saved_in_one_folder_stay_apart(trained_mlp, digits, tmp_path):
    x, y = digits.test.images()[:60], digits.test.y[:60]
    other = build_model("mlp", 1, 10, 8, digits.mean, digits.std, hidden=[64])
    a = rf.evaluate(trained_mlp, x, y, eps=0.1, attacks=["clean"])
    b = rf.evaluate(other, x, y, eps=0.1, attacks=["clean"])
    assert a.summary()["settings"]["sha256"] != b.summary()["settings"]["sha256"]
    assert a.summary()["settings"]["weights"] == "as given"
    first, second = a.save(tmp_path), b.save(tmp_path)
    assert first != second
    kept = json.loads(first.read_text())["attacks"]["clean"]
    assert kept == a.summary()["attacks"]["clean"]


def _spy(monkeypatch, module):
    seen = []
    real = module.make_generator

    def spy(seed, device):
        seen.append(seed)
        return real(seed, device)

    monkeypatch.setattr(module, "make_generator", spy)
    return seen


@pytest.mark.parametrize("attack", ["square", "apgd-ce"])
def test_stochastic_attacks_follow_the_run_seed(trained_mlp, digits, monkeypatch, attack):
    module = square_mod if attack == "square" else apgd_mod
    seen = _spy(monkeypatch, module)
    x, y = digits.test.images()[:40], digits.test.y[:40]
    kw = {"eps": 0.05, "batch_size": 20}
    spec = build_attack("square", "linf", n_queries=20) if attack == "square" else "apgd-ce3"
    draws = {}
    for seed in (0, 1, 0):
        seen.clear()
        res = rf.evaluate(trained_mlp, x, y, attacks=["clean", spec], seed=seed, **kw)
        draws.setdefault(seed, []).append(list(seen))
        shown = res.summary()["settings"]["attacks"][-1]["seed"]
        assert shown == f"per batch from run seed {seed}"
    assert draws[0][0] == draws[0][1]  # the same seed reproduces
    assert draws[0][0] != draws[1][0]  # another run seed, other draws
    assert len(set(draws[0][0])) == len(draws[0][0])  # each batch its own seed
    # a seed given to the attack itself is kept
    seen.clear()
    own = Square(norm="linf", n_queries=20, seed=7) if attack == "square" else \
        build_attack("apgd-ce3", "linf", seed=7)
    res = rf.evaluate(trained_mlp, x, y, attacks=["clean", own], seed=3, **kw)
    assert set(seen) == {7} and res.summary()["settings"]["attacks"][-1]["seed"] == 7


def test_autoattack_components_follow_the_run_seed(trained_mlp, digits, monkeypatch):
    seen = _spy(monkeypatch, square_mod)
    x, y = digits.test.images()[:30], digits.test.y[:30]
    aa = build_attack("autoattack", "linf", attacks=["square"], n_queries=10)
    runs = []
    for seed in (0, 5):
        seen.clear()
        rf.evaluate(trained_mlp, x, y, eps=0.05, attacks=["clean", aa], seed=seed)
        runs.append(list(seen))
    assert runs[0] and runs[0] != runs[1]


def test_tables_say_which_images_and_attack_settings(trained_mlp, digits):
    res = rf.evaluate(trained_mlp, "digits", eps=0.05, n=50,
                      attacks=["clean", Square(norm="linf", n_queries=15)])
    text = res.table()
    assert "images: 50 of" in text and "class-stratified" in text
    assert "square (15 queries" in text
    assert res.summary()["settings"]["versions"]["device"] == "cpu"


def test_a_custom_autoattack_is_not_named_like_the_standard_one():
    assert build_attack("autoattack", "linf").name == "autoattack"
    assert build_attack("autoattack50", "linf").name == "autoattack50"
    custom = AutoAttack(norm="linf", attacks=["apgd-ce", "square"], steps=10)
    assert custom.name.startswith("autoattack-custom") and "apgd-ce+square" in custom.name
    assert "10it" in custom.name
    assert AutoAttack(norm="linf", n_queries=100).name != "autoattack"


def test_the_plain_evaluator_seeds_square_from_the_run_seed(trained_mlp, digits, monkeypatch):
    from robustfair.engine.evaluator import evaluate

    seen = _spy(monkeypatch, square_mod)
    data = digits.test.subset(torch.arange(30))
    runs = []
    for seed in (0, 2, 0):
        seen.clear()
        evaluate(trained_mlp, data, [build_attack("square", "linf", n_queries=10)], 0.05,
                 batch_size=15, seed=seed)
        runs.append(list(seen))
    assert runs[0] == runs[2] and runs[0] != runs[1] and len(runs[0]) == 2
