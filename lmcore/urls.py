"""What URLs show of themselves in messages, logs and records: never a password."""
from __future__ import annotations

from urllib.parse import unquote


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages, logs and status; the one redaction, the
    service's routes use it too). The password is everything from the first ":" to the last "@" of the
    part after "//" up to the next "/": one holding an unescaped "@", "?" or "#" is hidden whole (urlsplit
    ends the user part at the last "@" but the host at "?" or "#"; a regex at the first "@"). The rest
    stays as written (host case, a port that is not a number): a URL too odd for urlsplit is still shown."""
    head, sep, rest = url.partition("//")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{head}//{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


def redact_redis_url(url: str) -> str:
    """``url`` as written, its password hidden wherever redis-py takes one: ``user:***@`` and a
    ``password=`` query field, its name percent-encoded or not (``?password=***``, the form for ``unix://``
    sockets). For what people and clients read."""
    url = redact_url(url)
    head, q, query = url.partition("?")
    if not q:
        return url
    query, hash_, frag = query.partition("#")
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}=***" if eq and unquote(name).strip().lower() == "password" else part)
    return f"{head}?{'&'.join(parts)}{hash_}{frag}"
