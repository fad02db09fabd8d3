"""ratelimit-svc: Envoy's global rate-limit service (envoyproxy/ratelimit compatible), in Python."""

__version__ = "0.1.0"
