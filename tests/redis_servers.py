"""The tests' Redis servers: the product's own `frame_cache.redis_server` (one server, or a 3-master
cluster), re-exported under the name the tests import."""
from frame_cache.redis_server import RedisClusterServers, RedisServer, free_port, redis_binaries_missing

__all__ = ["RedisServer", "RedisClusterServers", "redis_binaries_missing", "free_port"]
