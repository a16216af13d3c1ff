"""Shared fixtures: small real data (scikit-learn digits) and small models trained on it."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from robustfair.config import DataConfig
from robustfair.data import load_data
from robustfair.models import build_model

#: under pytest-xdist (``-n N``) the cores are shared by N workers
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


# ------------------------------------------------------------------ tests independent of order
#: signals whose handlers a test (or the library under test) may change. SIGALRM is
#: pytest-timeout's, which it sets and restores around each test itself.
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGCHLD",
                                              "SIGUSR1", "SIGUSR2", "SIGPIPE") if hasattr(signal, n))
#: environment variables a dependency sets once, when it is first imported or used (not a
#: test's doing): torch's inductor its cache folder and a switch of torch.compile,
#: scikit-learn and joblib two OpenMP switches, Ray its client mode; pytest the running test
_ENV_SET_BY_DEPENDENCIES = frozenset({"TORCHINDUCTOR_CACHE_DIR",
                                      "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
                                      "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                                      "RAY_CLIENT_MODE", "PYTEST_CURRENT_TEST"})


def _registries() -> dict[str, dict[str, object]]:
    from robustfair import registry

    return {f"{r.kind}@{id(r)}": dict(r._members) for r in registry.all_registries()}


def _global_state() -> dict[str, object]:
    """Process-wide state one test could leak into the next one run by the same worker."""
    return {
        "signal handlers": {signal.Signals(s).name: signal.getsignal(s) for s in _SIGNALS},
        "working directory": os.getcwd(),
        "environment": {k: v for k, v in os.environ.items() if k not in _ENV_SET_BY_DEPENDENCIES},
        "torch threads": torch.get_num_threads(),
        "torch deterministic algorithms": (torch.are_deterministic_algorithms_enabled(),
                                           torch.is_deterministic_algorithms_warn_only_enabled()),
        "torch default dtype": torch.get_default_dtype(),
        "torch grad mode": torch.is_grad_enabled(),
        "torch float32 matmul precision": torch.get_float32_matmul_precision(),
        "cudnn flags": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                        torch.backends.cudnn.enabled),
        "registries": _registries(),
    }


def _registry_leak(before: dict[str, dict[str, object]], after: dict[str, dict[str, object]]
                   ) -> list[str]:
    """Members removed or replaced, or added from outside robustfair (its own modules register
    themselves when a registry is first read, which is not a leak)."""
    bad = []
    for key, old in before.items():
        new = after.get(key, {})
        kind = key.split("@")[0]
        bad += [f"{kind} {n!r} removed or replaced" for n, obj in old.items()
                if new.get(n) is not obj]
        bad += [f"{kind} {n!r} added" for n, obj in new.items() if n not in old and
                not str(getattr(obj, "__module__", "")).startswith("robustfair.")]
    return bad


def _restore(state: dict[str, object]) -> None:
    for name, handler in state["signal handlers"].items():  # type: ignore[union-attr]
        signal.signal(getattr(signal, name), handler)
    os.chdir(state["working directory"])  # type: ignore[arg-type]
    env = state["environment"]
    for k in [k for k in os.environ if k not in env and k not in _ENV_SET_BY_DEPENDENCIES]:
        del os.environ[k]
    os.environ.update(env)  # type: ignore[arg-type]
    torch.set_num_threads(state["torch threads"])  # type: ignore[arg-type]
    det, warn = state["torch deterministic algorithms"]  # type: ignore[misc]
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.set_default_dtype(state["torch default dtype"])  # type: ignore[arg-type]
    torch.set_grad_enabled(state["torch grad mode"])  # type: ignore[arg-type]
    torch.set_float32_matmul_precision(state["torch float32 matmul precision"])  # type: ignore
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
     torch.backends.cudnn.enabled) = state["cudnn flags"]  # type: ignore[misc]
    from robustfair import registry

    for r in registry.all_registries():
        old = state["registries"].get(f"{r.kind}@{id(r)}")  # type: ignore[union-attr]
        if old is not None:
            r._members.clear()
            r._members.update(old)


@pytest.fixture(autouse=True)
def _no_leaked_global_state(request: pytest.FixtureRequest):
    """Fail a test that leaves process-wide state changed (signal handlers, working directory,
    environment, torch's global settings, registries), after putting that state back, so that
    no test depends on which tests its worker ran before it."""
    before = _global_state()
    yield
    after = _global_state()
    changed = [k for k in before if k != "registries" and before[k] != after[k]]
    leaked = _registry_leak(before["registries"], after["registries"])  # type: ignore[arg-type]
    if changed or leaked:
        details = []
        for k in changed:
            if isinstance(before[k], dict):
                b, a = before[k], after[k]
                keys = sorted(x for x in set(b) | set(a) if b.get(x) != a.get(x))  # type: ignore
                details.append(f"{k} ({', '.join(keys)})")
            else:
                details.append(f"{k} ({before[k]!r} -> {after[k]!r})")
        _restore(before)
        pytest.fail(f"the test left global state changed: {'; '.join(details + leaked)}; "
                    f"restore it in the test (monkeypatch, a fixture, or try/finally)",
                    pytrace=False)


def pytest_terminal_summary(terminalreporter, config) -> None:  # noqa: ANN001
    """Name the random order's seed (pytest-randomly), so that a failure can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"random order: seed {seed}; replay it with "
                                    f"'python -m pytest -q --randomly-seed={seed}'")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared, busy CPU two spinning threads per process are far
    slower than one. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    """Run ``robustfair ARGV`` in this process: (exit code, stdout, stderr)."""
    from robustfair.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


@pytest.fixture(scope="session")
def digits():
    """The digits bundle (8×8, 10 classes), with a validation split."""
    return load_data(DataConfig(name="digits", val_size=0.1))


def train_quick(model, data, epochs: int = 30, lr: float = 0.05, seed: int = 0, adv_eps=None):
    """Plain full-batch-ish training used by tests that need a trained model."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x = data.train.images()
    y = data.train.y
    from robustfair.attacks import build_attack

    pgd = build_attack("pgd5", "linf") if adv_eps else None
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = perm[i : i + 128]
            xb, yb = x[idx], y[idx]
            if pgd is not None:
                xb = pgd(model, xb, yb, adv_eps)
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """A SmallCNN trained normally on digits (about 97% clean accuracy)."""
    torch.manual_seed(0)
    m = build_model("smallcnn", 1, 10, 8, digits.mean, digits.std, dropout=0.0)
    return train_quick(m, digits, epochs=25)


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """An MLP trained normally on digits."""
    torch.manual_seed(0)
    m = build_model("mlp", 1, 10, 8, digits.mean, digits.std, hidden=[64])
    return train_quick(m, digits, epochs=30)


def write_cifar10(root, n_train=10, n_test=6):
    """Tiny random CIFAR-10 files in the standard layout (ROOT/cifar-10-batches-py); returns
    the test images and labels."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n_train)]},
                        f)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    labels = list(range(n_test))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return test, labels
