"""The small core every layer shares: error types with their codes (`lmcore.errors`), the
bounds several surfaces enforce alike (`lmcore.limits`) and the fusion policy (`lmcore.policy`).

`model/`, `stream/`, `frame_cache/`, the CLI (`lmstream/`) and the service (`deploy/`)
all raise and catch these, so a code means the same thing on every surface.
"""
