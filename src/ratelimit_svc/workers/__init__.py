"""Several processes sharing the gRPC port (WORKERS): the supervisor, the primary and worker roles,
and stats aggregation (docs/operations.md)."""
