"""The deploy tests reuse the in-process live stack of tests/e2e (make_stack)."""

from tests.e2e.conftest import make_stack  # noqa: F401  (a fixture, registered by import)
