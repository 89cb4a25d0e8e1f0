"""Commands: one module per CLI verb; each owns its MLflow run and is the only place that logs."""
