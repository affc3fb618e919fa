"""Tune stage: search space (space), sweep driver (driver), summary and winner (summary)."""
