"""Sweeps: grids of training runs (recipes × seeds × overrides) on a local pool or on Ray."""

from .core import SweepResult, plan, run_sweep, run_trial, trial_action
from .runner import default_workers, run_jobs
from .spec import SweepSpec, Trial, expand, load_spec

__all__ = ["SweepResult", "SweepSpec", "Trial", "default_workers", "expand", "load_spec", "plan",
           "run_jobs", "run_sweep", "run_trial", "trial_action"]
