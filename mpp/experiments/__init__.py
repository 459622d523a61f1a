"""Experiments over many runs: the transfer gap (scratch vs MPP vs supervised) and the ablation."""
