"""Metrics derived from the per-sample correctness matrix: per class (each class divided by its
own count), worst class, best−worst gap, std across classes, and ρ (DAFA)."""

from .classwise import class_summary, per_class_accuracy, rho

__all__ = ["class_summary", "per_class_accuracy", "rho"]
