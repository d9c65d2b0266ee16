"""Thin Prefect tasks: one per stage; retries, cache keys, persisted results, MLflow logging."""
