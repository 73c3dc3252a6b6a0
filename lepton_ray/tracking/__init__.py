"""MLflow tracking: runs, nested runs, lineage tags, registry and plots."""
