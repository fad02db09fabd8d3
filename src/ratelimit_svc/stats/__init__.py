"""Stats: the in-process registry the service records into, the flush loop, and the
statsd/DogStatsD and Prometheus sinks (docs/observability.md)."""
