"""Evaluation: benchmarks, sweeps, datasets and metrics (installed as tokendrop.eval)."""
