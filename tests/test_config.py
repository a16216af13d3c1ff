"""Configuration: validation with errors that name the field, overrides, recipes, and the CLI's
clear one-line errors (exit code 2, no traceback, no half-written run directory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_cli as run_cli_here

from robustfair.config import load_config, recipe_names
from robustfair.errors import UserError


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"attack": {"eps": -0.1}}, "attack.eps"),
        ({"attack": {"norm": "l3"}}, "attack.norm"),
        ({"data": {"name": "imagenet22k"}}, "unknown dataset 'imagenet22k'"),
        ({"model": {"name": "resnet19"}}, "did you mean 'resnet18'"),
        ({"method": {"objective": {"name": "tradez"}}}, "unknown objective 'tradez'"),
        ({"method": {"objective": {"name": "trades", "betta": 1}}},
         "method.objective.betta: unknown key"),
        ({"method": {"objective": {"name": "trades", "beta": -1}}}, "method.objective.beta"),
        ({"eval": {"attacks": ["pgd20", "foo"]}}, "unknown attack 'foo'"),
        ({"name": "a/b"}, "name"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, data, needle):
    with pytest.raises(UserError) as exc:
        load_config(write(tmp_path, data))
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


def test_overrides_and_fractions():
    cfg = load_config(recipe="mnist5k-trades", overrides=[
        "train.epochs=3", "attack.eps=8/255", "method.objective.beta=3", "eval.attacks=clean,pgd5"])
    assert cfg.train.epochs == 3
    assert abs(cfg.attack.eps - 8 / 255) < 1e-12
    # the resolved config records the objective's attack start (official: raw x + 0.001·N)
    assert cfg.method.objective == {"name": "trades", "beta": 3.0, "start": "normal"}
    assert cfg.eval.attacks == ["clean", "pgd5"]
    # changing a part's name drops the old part's parameters
    cfg = load_config(recipe="mnist5k-trades", overrides=["method.objective.name=pgd_at"])
    assert cfg.method.objective["name"] == "pgd_at" and "beta" not in cfg.method.objective
    with pytest.raises(UserError, match="expected key=value"):
        load_config(recipe="mnist5k-trades", overrides=["train.epochs"])


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_validates(name):
    cfg = load_config(recipe=name)
    assert cfg.name == name


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown recipe"):
        load_config(recipe="nope")
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robustfair.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--recipe", "mnist5k-trades", "--set", "train.epochs=x"], "train.epochs"),
        (["train", "--recipe", "mnist5k-trades", "--set", "data.name=cifar10"], "data.root"),
        (["train", "--recipe", "mnist5k-trades", "--set", "data.name=cifar10",
          "--set", "data.root=/nonexistent/dir"], "does not exist"),
        (["train", "--recipe", "nope"], "unknown recipe"),
        (["train"], "give a CONFIG file"),
        (["eval", "no-such-run"], "not a run directory"),
    ],
)
def test_cli_errors_are_one_line_exit_2_and_leave_nothing(tmp_path, args, needle, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli_here(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_cli_error_in_a_real_process_is_one_line(tmp_path):
    r = run_cli("train", "--recipe", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown recipe" in lines[0], r.stderr


def test_cli_listings(capsys):
    for what, expect in (("recipes", "mnist5k-trades"), ("datasets", "mnist5k"),
                         ("models", "smallcnn"), ("methods", "trades"), ("attacks", "pgd")):
        code, out, _ = run_cli_here([what], capsys)
        assert code == 0 and expect in out
        assert all(len(line.split()) >= 2 for line in out.strip().splitlines())
