"""Prefect flows and the npd CLI."""
