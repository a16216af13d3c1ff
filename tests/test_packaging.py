"""The package as a user installs it: a wheel built from this tree, installed into a new virtual
environment, lists its recipes and checks one of them. A file the wheel leaves out (a recipe, a
data module, a subpackage) fails here, where the editable install used by the rest of the suite
would still find it in the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (ROOT / "src" / "robustfair" / "recipes").glob("*.yaml"))


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_wheel_in_a_new_environment_lists_and_checks_recipes(tmp_path: Path) -> None:
    # the wheel, built without network access by the setuptools installed here
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(ROOT)], tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("robustfair-*.whl")
    # a new environment; its dependencies (torch and the rest, already installed here) come
    # from this interpreter's site-packages, robustfair only from the wheel
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    installed = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                      "-q", str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([str(py), "-c", "import robustfair; print(robustfair.__file__)"], tmp_path,
                 clean_env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout  # not the source tree
    cli = env_dir / "bin" / "robustfair"
    listed = _run([str(cli), "recipes"], tmp_path, clean_env)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert sorted(set(names) & set(RECIPES)) == RECIPES  # every recipe of the tree is packaged
    checked = _run([str(cli), "train", "--recipe", "dafa-mnist5k", "--check"], tmp_path,
                   clean_env)
    assert checked.returncode == 0, checked.stderr
    assert "# ok: mnist5k" in checked.stdout
