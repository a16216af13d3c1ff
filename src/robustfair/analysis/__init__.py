"""Analyses of trained runs."""
