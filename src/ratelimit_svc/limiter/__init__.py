"""The rate-limit core: the counter-store contract, descriptor matching, windows, the local over-
limit cache and the limiter that decides (docs/architecture.md)."""
