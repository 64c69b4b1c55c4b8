"""Per-stream ring buffers of compressed per-frame states.

`FrameRecord` + `encode_record`/`decode_record` define the versioned binary
layout of one frame; `FrameCache` is the backend interface (in-process now,
Redis later); `InProcessFrameCache` is the embedded backend.
"""
from .base import (
    KEY_PREFIX,
    MAX_STREAM_META_BYTES,
    STREAM_ID_PATTERN,
    CacheBudgetExceeded,
    CacheClosed,
    FrameCache,
    Snapshot,
    StreamExists,
    StreamInfo,
    StreamNotFound,
    stream_key,
    validate_stream_id,
    validate_stream_meta,
)
from .memory import DEFAULT_PTS_HISTORY, MAX_CAPACITY, InProcessFrameCache
from .record import (
    MAX_HEADER_BYTES,
    RECORD_MAGIC,
    RECORD_VERSION,
    SUPPORTED_DTYPES,
    FrameRecord,
    RecordFormatError,
    decode_record,
    encode_record,
    record_header,
)

__all__ = [
    "FrameRecord",
    "RecordFormatError",
    "RECORD_MAGIC",
    "RECORD_VERSION",
    "SUPPORTED_DTYPES",
    "MAX_HEADER_BYTES",
    "encode_record",
    "decode_record",
    "record_header",
    "FrameCache",
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
