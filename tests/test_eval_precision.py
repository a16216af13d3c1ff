"""eval.precision: the attacks' own passes in bf16 only where a check against fp32 agrees, and
every verdict in fp32."""

from __future__ import annotations

import pytest
import torch

from robustfair.engine import staged
from robustfair.engine.record import evaluation_key
from robustfair.engine.staged import Bf16Logits, evaluate_staged, precision_used, resolve_precision
from robustfair.errors import UserError

EPS = 0.1


def _split(digits, n=60):
    return digits.test.subset(torch.arange(n))


def test_auto_is_fp32_on_the_cpu_and_unknown_values_are_refused():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UserError, match="unknown precision 'fp16'; use one of fp32, bf16, auto"):
        resolve_precision("fp16", torch.device("cpu"))


def test_a_weaker_bf16_falls_back_to_fp32_and_gives_the_fp32_result(trained_mlp, digits,
                                                                     monkeypatch):
    """A bf16 model that hides the gradient (its attacks break nothing) fails the check on the
    first batch; the row then runs in fp32 and its numbers are those of an fp32 evaluation."""
    split = _split(digits)
    ref = evaluate_staged(trained_mlp, split, ["clean", "pgd10"], EPS, batch_size=20)
    assert (~ref.row("pgd10")).sum() > (~ref.row("clean")).sum()  # PGD breaks points here

    def blind(self, x):  # noqa: ANN001
        return self.model(x).detach() + 0 * x.flatten(1)[:, :1]

    monkeypatch.setattr(Bf16Logits, "forward", blind)
    res = evaluate_staged(trained_mlp, split, ["clean", "pgd10"], EPS, batch_size=20,
                          precision="bf16")
    check = res.settings["precision"]["checks"]["pgd10"]
    assert check["used"] == "fp32" and check["bf16_missed"] > 0 and check["bf16_broke"] == 0
    assert check["points"] == 20  # the first batch of the points PGD attacks (clean-correct)
    assert torch.equal(res.row("pgd10"), ref.row("pgd10"))
    assert precision_used(res.settings) == "fp32"
    assert "precision" not in evaluation_key(res.settings)  # its numbers are fp32 numbers


def test_an_agreeing_bf16_is_used_for_the_rest_of_the_row(trained_mlp, digits, monkeypatch):
    """A bf16 model that agrees passes the check and attacks every later batch; verdicts are
    taken on the model itself (here the same numbers, so the same matrix)."""
    split = _split(digits)
    ref = evaluate_staged(trained_mlp, split, ["clean", "pgd10"], EPS, batch_size=20)
    calls = []

    def same(self, x):  # noqa: ANN001
        calls.append(len(x))
        return self.model(x)

    monkeypatch.setattr(Bf16Logits, "forward", same)
    res = evaluate_staged(trained_mlp, split, ["clean", "pgd10"], EPS, batch_size=20,
                          precision="bf16")
    check = res.settings["precision"]["checks"]["pgd10"]
    assert check == {**check, "used": "bf16", "bf16_missed": 0}
    assert torch.equal(res.row("pgd10"), ref.row("pgd10"))
    # every batch went through the bf16 model, the same number of passes per point (PGD-10)
    todo = int(ref.row("clean").sum())
    assert todo > 40 and sum(calls) % todo == 0 and sum(calls) // todo >= 10
    assert precision_used(res.settings) == "bf16"
    assert evaluation_key(res.settings)["precision"] == "bf16"  # recorded beside fp32 runs


def test_bf16_autocast_runs_every_autoattack_component_and_is_recorded(trained_mlp, digits):
    """Real bf16 autocast (CPU) through APGD-CE, APGD-T, FAB-T and Square (their own passes see
    fp32 logits, so no component trips over a dtype): every row attacks points and records its
    check."""
    from robustfair.attacks.autoattack import AutoAttack

    split = _split(digits, 30)
    atk = AutoAttack(version="standard", n_queries=100, steps=10)
    res = evaluate_staged(trained_mlp, split, ["clean", atk], EPS, batch_size=30,
                          precision="bf16")
    prec = res.settings["precision"]
    rows = [r for r in res.attacks if r.startswith(atk.name + "/")]
    assert len(rows) == 4 and prec["requested"] == "bf16" and set(prec["checks"]) == set(rows)
    for row in rows:
        c = prec["checks"][row]
        assert c["points"] == res.settings["stage_time"][row]["points"] > 0
        assert c["used"] == ("fp32" if c["bf16_missed"] else "bf16")


def test_the_checks_survive_a_resume(trained_mlp, digits, tmp_path, monkeypatch):
    """An evaluation stopped after its check resumes with the decision it made (no second
    check) and a resume under another precision is refused."""
    split = _split(digits)
    state = tmp_path / "state.json"
    real = staged._run_stage
    seen = []

    def stop_after_pgd(*a, **k):  # noqa: ANN002, ANN003
        out = real(*a, **k)
        seen.append(a[2].row)
        if a[2].row == "pgd10":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(staged, "_run_stage", stop_after_pgd)
    with pytest.raises(KeyboardInterrupt):
        evaluate_staged(trained_mlp, split, ["clean", "pgd10", "fgsm"], EPS, batch_size=20,
                        precision="bf16", state_path=state)
    monkeypatch.setattr(staged, "_run_stage", real)
    with pytest.raises(UserError, match="other settings"):
        evaluate_staged(trained_mlp, split, ["clean", "pgd10", "fgsm"], EPS, batch_size=20,
                        state_path=state, resume=True)
    res = evaluate_staged(trained_mlp, split, ["clean", "pgd10", "fgsm"], EPS, batch_size=20,
                          precision="bf16", state_path=state, resume=True)
    assert set(res.settings["precision"]["checks"]) == {"pgd10", "fgsm"}
