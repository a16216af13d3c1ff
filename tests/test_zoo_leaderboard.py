"""Models people already have: a RobustBench zoo architecture with weights in RobustBench's local
layout (offline), strict loading that names the keys, and the leaderboard of several models on
the same images."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from conftest import run_cli as cli
from conftest import write_cifar10

from robustfair.models import zoo

NAME = "Wong2020Fast"  # a PreAct ResNet-18 with its normalization inside


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    """Tiny CIFAR-10 files, and the weights of a zoo architecture (random, seeded) saved where
    RobustBench keeps them: MODEL_DIR/cifar10/Linf/NAME.pt, as {'state_dict': module.*}."""
    pytest.importorskip("timm")
    if __import__("importlib").util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (pip install 'robustfair[robustbench]')")
    root = tmp_path_factory.mktemp("zoo")
    write_cifar10(root / "data", n_train=2, n_test=10)
    torch.manual_seed(0)
    net = zoo.zoo_entry(NAME, "cifar10", "linf")["model"]().eval()
    path = zoo.weights_path(NAME, "cifar10", "linf", root / "models")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return root, net


def test_robustbench_model_is_evaluated_from_the_local_layout(zoo_files, capsys):
    root, net = zoo_files
    code, out, err = cli(["eval", "--robustbench", NAME, "--dataset", "cifar10", "--threat",
                          "linf", "--model-dir", str(root / "models"), "--data-root",
                          str(root / "data"), "--attack", "fgsm", "--out", str(root / "ev"),
                          "-q"], capsys)
    assert code == 0, err
    s = json.loads((root / "ev" / "summary.json").read_text())
    from robustfair.config import DataConfig
    from robustfair.data import load_data

    test = load_data(DataConfig(name="cifar10", root=str(root / "data"))).test
    with torch.no_grad():
        pred = net(test.images()).argmax(1)
    assert s["confusion"]["clean"] == torch.bincount(
        test.y * 10 + pred, minlength=100).reshape(10, 10).tolist()
    st = s["settings"]
    assert st["model"] == f"robustbench:{NAME}" and st["eps"] == pytest.approx(8 / 255)
    assert st["norm"] == "linf" and len(st["sha256"]) == 64


def test_robustbench_errors_are_one_line(zoo_files, capsys, tmp_path, monkeypatch):
    root, net = zoo_files
    base = ["eval", "--dataset", "cifar10", "--data-root", str(root / "data"), "-q"]
    code, _, err = cli([*base, "--robustbench", NAME, "--model-dir", str(tmp_path)], capsys)
    assert code == 2 and "no weights for" in err and "cifar10/Linf" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli([*base, "--robustbench", "Wong2020Fst", "--model-dir",
                        str(root / "models")], capsys)
    assert code == 2 and "did you mean Wong2020Fast" in err
    # weights of another architecture: the missing and unexpected keys are named
    bad = zoo.weights_path(NAME, "cifar10", "linf", tmp_path)
    bad.parent.mkdir(parents=True)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("linear")}
    torch.save({**state, "head.weight": torch.zeros(3)}, bad)
    code, _, err = cli([*base, "--robustbench", NAME, "--model-dir", str(tmp_path)], capsys)
    assert code == 2 and "missing keys 2 (linear.weight, linear.bias)" in err
    assert "unexpected keys 1 (head.weight)" in err
    # pickled code is refused
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": print}, bad)
    code, _, err = cli([*base, "--robustbench", NAME, "--model-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    # without the package
    monkeypatch.delitem(sys.modules, "robustbench.model_zoo")
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda name: None)
    code, _, err = cli([*base, "--robustbench", NAME], capsys)
    assert code == 2 and "pip install 'robustfair[robustbench]'" in err


def test_leaderboard_rows_share_images_and_record_them(trained_mlp, digits, tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(trained_mlp.state_dict(), a)
    noisy = {k: v + 0.3 * torch.randn_like(v) if k.endswith("weight") else v
             for k, v in trained_mlp.state_dict().items()}
    torch.save(noisy, b)
    out = tmp_path / "lb"
    code, text, err = cli(["leaderboard", str(a), str(b), "--dataset", "digits", "--model",
                           "mlp", "--set", "model.params.hidden=[64]", "--attack", "pgd5",
                           "--eps", "0.1", "--n", "100",
                           "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert "| model | clean | pgd5 | worst class |" in text and "ρ vs a" in text
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["model"] for r in rows] == ["a", "b"]
    assert float(rows[0]["rho"]) == pytest.approx(0.0)
    assert rows[0]["images_sha256"] == rows[1]["images_sha256"]
    assert all(r["images_n"] == "100" for r in rows)
    board = json.loads((out / "leaderboard.json").read_text())
    rec = board["rows"][1]["record"]
    assert rec["seed"] == 0 and rec["eps"] == pytest.approx(0.1) and rec["norm"] == "linf"
    assert len(rec["images"]["indices"]) == 100 and rec["versions"]["torch"]
    assert rec["attack"]["attack"] == "pgd5" and rec["attack"]["steps"] == 5
    s = board["rows"][1]["summary"]["attacks"]["pgd5"]
    assert float(rows[1]["robust"]) == pytest.approx(s["avg"])
    assert rows[1]["worst"] == str(min(s["per_class"]))
    assert (out / "leaderboard.html").read_text().count("sha256") >= 2
    assert (out / "b" / "summary.json").exists()


def test_robustbench_file_without_normalization_buffers_loads(zoo_files, tmp_path, capsys):
    root, net = zoo_files
    path = zoo.weights_path(NAME, "cifar10", "linf", tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({k: v for k, v in net.state_dict().items() if k not in ("mu", "sigma")}, path)
    model, _ = zoo.load_zoo_model(NAME, "cifar10", "linf", tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x))
    # --robustbench: no ImageNet loader, and a norm that is not the threat's is refused
    base = ["eval", "--robustbench", NAME, "--model-dir", str(tmp_path), "--data-root",
            str(root / "data"), "-q"]
    code, _, err = cli([*base, "--dataset", "imagenet"], capsys)
    assert code == 2 and "ImageNet" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli([*base, "--dataset", "cifar10", "--threat", "l2", "--norm", "linf"],
                       capsys)
    assert code == 2 and "--threat" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [["-a", "clean"], ["--eps", "abc"], ["--n", "0"],
                                 ["--n", "-3"], ["--batch-size", "0"], ["-a", "pgdx"],
                                 ["MISSING"]])
def test_leaderboard_refuses_bad_input_before_writing(trained_mlp, tmp_path, capsys, bad):
    a = tmp_path / "a.pt"
    torch.save(trained_mlp.state_dict(), a)
    models = [str(a), str(tmp_path / "missing.pt")] if bad == ["MISSING"] else [str(a), str(a)]
    opts = [] if bad == ["MISSING"] else bad
    out = tmp_path / "lb"
    code, _, err = cli(["leaderboard", *models, "--dataset", "digits", "--model", "mlp",
                        "--set", "model.params.hidden=[64]", "-a", "pgd2", "--eps", "0.1",
                        "--n", "20", *opts, "--out", str(out), "-q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
