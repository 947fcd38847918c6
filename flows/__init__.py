"""Prefect flows composing the stage tasks into DAGs."""
