"""Serving fixtures (the helpers are in serving_helpers.py)."""

from serving_helpers import identities, parts  # noqa: F401 - fixtures
