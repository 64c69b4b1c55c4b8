"""Shared fixtures: tiny checkpoints in the official layout, made once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Triton kernels run on the CPU through the interpreter in tests (no GPU here).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

# one `lmstream serve` per session, shared by test_service.py and test_web_page.py (registered here once:
# imported into each test file, each would start its own); stopped once the tests that use it are done
from service_fixtures import media, redis_srv, service, shared_service, stop_when_done  # noqa: E402, F401


@pytest.hookimpl(trylast=True)          # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    stop_when_done(item, nextitem)

# Under pytest-xdist (run-tests.sh: two workers on this 2-core machine) each worker computes on one
# thread, so that one worker's tensors do not starve the other's Ray, Redis and RTSP processes.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_finish(session):
    """`--dist loadgroup` sends every test marked `xdist_group("ray")` to one worker, so two files never
    run Ray (and their services' ports, folders and CPU) at once. pytest-xdist does it by suffixing the
    test's node id with "@ray"; where the pair of versions installed cannot (pytest 9 with xdist 3.8),
    the mark does nothing and those files would run side by side. Each such test then fails at once,
    saying why, instead of starting a service beside another."""
    if session.config.getoption("loadgroup", False):
        session.config.stash[_UNGROUPED] = {i.nodeid for i in session.items
                                            if i.get_closest_marker("xdist_group") and "@" not in i.nodeid}


_UNGROUPED = pytest.StashKey[set]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.nodeid in item.config.stash.get(_UNGROUPED, ()):
        pytest.fail(f"expected --dist loadgroup to send this test to its xdist_group's worker, got it without "
                    f"its group (pytest {pytest.__version__} with this pytest-xdist: install the versions "
                    "pyproject.toml's test extra names, `scripts/setup.sh test`)", pytrace=False)


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    # Model loaders turn autograd off for their whole process (deploy.serving.load_model, right for a
    # Ray actor; lmstream's load_model, right for one command); a test that runs one in the pytest
    # worker must not leave it off for the tests after it (a gradient test failed so when xdist
    # happened to put it there)
    grad = torch.is_grad_enabled()
    yield
    torch.set_grad_enabled(grad)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from model.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from model import LlavaMini
    return LlavaMini.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_oracle(tiny_ckpt):
    from model.oracle import OracleLlavaMini
    return OracleLlavaMini.from_pretrained(tiny_ckpt, dtype=torch.float32)


def frames(T: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, size, size, generator=g)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = ""):
    """Like torch.testing.assert_close, but says where and by how much."""
    diff = (actual.float() - expected.float()).abs()
    bound = atol + rtol * expected.float().abs()
    bad = diff > bound
    if bad.any():
        i = int(diff.flatten().argmax())
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements differ beyond atol={atol} rtol={rtol}; "
            f"max abs diff {diff.max().item():.3e} at {idx}: actual {actual.flatten()[i].item():.6f} "
            f"expected {expected.flatten()[i].item():.6f}")


# --------------------------------------------------------------------------- frame-cache backends
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real ``redis-server`` (AOF, appendfsync everysec) on a free loopback port for the
    whole session, with its files in a temporary folder; stopped by its pid at the end.
    Fails (never skips) when redis-server is not installed."""
    from redis_servers import RedisServer, redis_binaries_missing
    missing = redis_binaries_missing()
    if missing:
        pytest.fail(missing, pytrace=False)
    with RedisServer(tmp_path_factory.mktemp("redis-session")) as srv:
        yield srv


@pytest.fixture(params=["memory", "redis"])
def cache_backend(request) -> str:
    """The frame-cache backend a conformance test runs on: "memory" or "redis"."""
    return request.param


@pytest.fixture
def any_cache_factory(cache_backend, request):
    """``make(**options) -> FrameCache``: a new, empty cache of the test's backend with the
    given options (``max_bytes_per_stream``, ``max_bytes_total``, ``pts_history``, ...).

    Redis caches live on the session's `redis_server`, each under its own fresh key prefix
    (so two caches made in one test are as separate as two in-process ones); their keys are
    removed and every cache closed when the test ends."""
    import uuid

    from frame_cache import InProcessFrameCache
    made, prefixes = [], []
    server = request.getfixturevalue("redis_server") if cache_backend == "redis" else None

    def make(**options):
        if server is None:
            c = InProcessFrameCache(**options)
        else:
            from frame_cache.redis_cache import RedisFrameCache
            prefixes.append(f"t{uuid.uuid4().hex[:12]}")
            c = RedisFrameCache.from_url(server.url, prefix=prefixes[-1], **options)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
    if server is not None and prefixes:
        r = server.client()
        try:
            for p in prefixes:
                keys = list(r.scan_iter(match=f"{p}:*", count=1000))
                if keys:
                    r.unlink(*keys)
        finally:
            r.close()


@pytest.fixture
def any_cache(any_cache_factory):
    """A fresh, empty `FrameCache` with default options, on each backend in turn
    (parametrized through `cache_backend`: test ids end in ``[memory]`` / ``[redis]``)."""
    return any_cache_factory()
