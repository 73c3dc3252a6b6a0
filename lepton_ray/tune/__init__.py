"""Hyperparameter sweeps: Ray Tune + Optuna + ASHA, one Ray Train run per trial."""
