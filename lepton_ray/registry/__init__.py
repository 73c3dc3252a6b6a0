"""The model registry: versions and aliases, the promotion gate, and retraining."""
