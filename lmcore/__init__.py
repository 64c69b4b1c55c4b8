"""The small core every layer shares: error types with their codes (`lmcore.errors`) and the
bounds several surfaces enforce alike (`lmcore.limits`).

`model/`, `stream/`, `frame_cache/`, the CLI (`lmstream/`) and the service (`deploy/`)
all raise and catch these, so a code means the same thing on every surface.
"""
