"""robustfair: train and evaluate image classifiers that are adversarially robust and fair.

A training method is four parts chosen by name: an objective (what loss), a budget (how large a
perturbation, per sample and per pixel), weights or an adaptive policy (how much each sample
counts), and a sampler (which samples form a batch)."""

__version__ = "0.1.0"
