"""Several trainings in one torchrun launch, for tests/test_distributed.py (a launch costs far more
than these small trainings).

Usage: ``torchrun --nproc_per_node=N tests/dist_worker.py JOBS.json``, where JOBS.json is a list
of ``{"config": PATH, "stop_after": [GLOBAL_STEP, ...], "dump": DIR}``. Each job is trained as
``robustfair train`` trains it, without the final table. ``stop_after``: the training stops
after each of these global steps (before that step's checkpoint), in every process, and is
resumed from its last checkpoint, as a killed and restarted run is. ``dump``: after training,
every process writes the state of its model and objective to DIR/state-rank{R}.pt."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from robustfair.commands.run import train_run
from robustfair.config import load_config
from robustfair.engine import distributed
from robustfair.engine.trainer import Trainer
from robustfair.samplers.base import Sampler


class Stop(Exception):
    """Raised in every process after a chosen global step."""


STOP: set[int] = set()
DUMP: list[Path] = []

_on_step = Sampler.on_step
_fit = Trainer.fit


def on_step(self: Sampler, step: int, model: Any) -> None:  # noqa: ANN401
    _on_step(self, step, model)
    if step in STOP:
        STOP.discard(step)
        raise Stop


def fit(self: Trainer, resume: bool = False) -> None:
    _fit(self, resume)
    if DUMP:
        torch.save({"model": self.model.state_dict(), "objective": self.objective.state_dict()},
                   DUMP[0] / f"state-rank{self.rank}.pt")


def main(jobs_file: str) -> None:
    Sampler.on_step = on_step  # type: ignore[method-assign]
    Trainer.fit = fit  # type: ignore[method-assign]
    for job in json.loads(Path(jobs_file).read_text(encoding="utf-8")):
        cfg = load_config(job["config"], None, [])
        STOP.clear()
        STOP.update(job.get("stop_after", []))
        DUMP[:] = [Path(job["dump"])] if job.get("dump") else []
        resume = False
        while True:
            try:
                train_run(cfg, resume=resume, quiet=True)
                break
            except Stop:
                resume = True
            distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
