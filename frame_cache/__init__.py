"""Per-stream ring buffers of compressed per-frame states.

`FrameRecord` + `encode_record`/`decode_record` define the versioned binary
layout of one frame; `FrameCache` is the backend interface; `InProcessFrameCache` is the embedded
backend (the CLI), `RedisFrameCache` the service's; `open_cache(url)` picks one.
"""
from .base import (
    KEY_PREFIX,
    MAX_STREAM_META_BYTES,
    STREAM_ID_PATTERN,
    CacheBudgetExceeded,
    CacheClosed,
    ON_FULL,
    FrameCache,
    FrameWindow,
    Snapshot,
    WindowChunk,
    StreamExists,
    StreamInfo,
    StreamNotFound,
    stream_key,
    validate_stream_id,
    validate_stream_meta,
)
from lmcore.errors import CacheUnavailable, CapacityExceeded, StaleWriter

from .memory import DEFAULT_PTS_HISTORY, MAX_CAPACITY, InProcessFrameCache
from .record import (
    MAX_HEADER_BYTES,
    RECORD_MAGIC,
    RECORD_VERSION,
    DTYPE_ITEMSIZE,
    FrameRecord,
    RecordFormatError,
    KV_TENSORS,
    decode_record,
    encode_record,
    light_record,
    token_record,
    record_seq,
    decode_stacked,
    decode_columns,
    record_header,
)

__all__ = [
    "FrameRecord",
    "RecordFormatError",
    "RECORD_MAGIC",
    "RECORD_VERSION",
    "DTYPE_ITEMSIZE",
    "MAX_HEADER_BYTES",
    "encode_record",
    "decode_record",
    "record_header",
    "FrameCache",
    "FrameWindow",
    "WindowChunk",
    "ON_FULL",
    "light_record",
    "token_record",
    "record_seq",
    "decode_stacked",
    "decode_columns",
    "KV_TENSORS",
    "CapacityExceeded",
    "StaleWriter",
    "CacheUnavailable",
    "RedisFrameCache",
    "open_cache",
    "Snapshot",
    "StreamInfo",
    "StreamNotFound",
    "StreamExists",
    "CacheBudgetExceeded",
    "CacheClosed",
    "STREAM_ID_PATTERN",
    "KEY_PREFIX",
    "MAX_STREAM_META_BYTES",
    "stream_key",
    "validate_stream_id",
    "validate_stream_meta",
    "InProcessFrameCache",
    "MAX_CAPACITY",
    "DEFAULT_PTS_HISTORY",
]


def __getattr__(name):
    if name == "SUPPORTED_DTYPES":      # the torch dtypes: torch is imported on first use (frame_cache.record)
        from .record import SUPPORTED_DTYPES
        return SUPPORTED_DTYPES
    if name == "RedisFrameCache":       # redis-py is only needed for the Redis backend
        from .redis_cache import RedisFrameCache
        return RedisFrameCache
    raise AttributeError(name)


def open_cache(url: str | None = None, **kw) -> FrameCache:
    """A frame cache from a URL: None / "" / "memory://" -> in-process;
    "redis://host:port/db" (or "rediss://", "unix://") -> `RedisFrameCache`."""
    from lmcore.errors import BadArgument
    if not url or url == "memory://":
        return InProcessFrameCache(**kw)
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        from .redis_cache import RedisFrameCache
        try:
            return RedisFrameCache.from_url(url, **kw)
        except ValueError as e:            # redis-py's URL parser: bad port, bad IPv6 literal, ...
            raise BadArgument(f"expected a cache URL redis://HOST:PORT[/DB], got {url!r} ({e})") from None
    raise BadArgument(f"expected a cache URL memory:// or redis://HOST:PORT[/DB], got {url!r}")
