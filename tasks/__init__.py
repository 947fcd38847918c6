"""Prefect tasks: thin wrappers over moa_core that log to MLflow."""
