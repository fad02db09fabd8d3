"""The listeners: gRPC (ShouldRateLimit and health), the HTTP API, the debug port, TLS and health
state (docs/operations.md)."""
