"""Core: pure library code (ABID format, data, models, heads, features, metrics, checkpoints...).

Imports only the core; never MLflow's fluent logging, argparse or prints for users."""
