"""Test support shared by every tier: a fake clock, real servers started on free loopback ports
(Redis, Redis Cluster/Sentinel, memcached), a fault proxy, the service's environment, Envoy's
generated protobuf and an in-test xDS server."""
