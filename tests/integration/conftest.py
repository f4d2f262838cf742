"""Fixtures of the integration tests beyond the session's stack (tests/conftest.py)."""

from tests.integration.harness import scenario  # noqa: F401  (the fixture, defined with its harness)
