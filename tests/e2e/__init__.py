"""End-to-end tests through the real Envoy binary (a package, so its conftest is ``e2e.conftest``
and cannot shadow the top-level ``conftest`` module that other tests import from)."""
