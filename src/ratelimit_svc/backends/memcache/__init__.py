"""Counters in memcached (BACKEND_TYPE=memcache): a small asyncio client and the store
(docs/backends.md)."""
