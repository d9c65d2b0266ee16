"""npd_core: Near-Policy Distillation as a plain library (no Prefect, no MLflow)."""

__version__ = "0.1.0"
