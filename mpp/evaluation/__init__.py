"""Evaluation: frozen-feature probes, diagnostics of what a model learned, figures, statistics over seeds."""
