"""Bounds that several surfaces enforce alike (the engine, the CLI before the model loads, the
service's request schemas), kept in one place so they cannot drift apart."""
from __future__ import annotations

#: Candidate answers one question may carry (`choices`; `LlavaMini.score_choices`).
MAX_CHOICES = 64
