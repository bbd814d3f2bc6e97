import contextlib
import itertools
import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
import ray
import torch
from ray import serve

from kvserve.cluster.app import build_app
from kvserve.cluster.config import load_config
from kvserve.cluster.tiny_model import build_tiny_checkpoint
from kvserve.kernels.metadata import AttentionMetadata
from kvserve.workers.models.distributed import free_port

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """arch -> folder of a tiny random-weight checkpoint with its tokenizer, built once."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_checkpoint(root / arch, arch) for arch in TINY_ARCHS}


def random_block_tables(
    lengths: list[int], block_size: int, num_blocks: int, seed: int = 0
) -> list[list[int]]:
    """Enough blocks for each length, handed out from a shuffled pool."""
    pool = iter(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    return [list(itertools.islice(pool, -(-n // block_size))) for n in lengths]


def paged_metadata(
    block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int
) -> AttentionMetadata:
    """One step's metadata; sequence i's new tokens are the last query_lens[i] of its
    context_lens[i]. Sequences with one new token must come first."""
    starts = [0, *itertools.accumulate(query_lens)]
    slots = [
        table[p // block_size] * block_size + p % block_size
        for table, ctx, q in zip(block_tables, context_lens, query_lens)
        for p in range(ctx - q, ctx)
    ]
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        num_decodes=sum(1 for _ in itertools.takewhile(lambda q: q == 1, query_lens)),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(query_lens),
        max_context_len=max(context_lens),
        query_start_loc_cpu=starts,
        context_lens_cpu=list(context_lens),
    )


@pytest.fixture(scope="session")
def paged():
    """The helpers above, for tests that lay out a paged batch by hand."""
    return SimpleNamespace(block_tables=random_block_tables, metadata=paged_metadata)


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """A local Ray of `num_cpus` CPUs, with Serve and Ray shut down however the block ends."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        yield
    finally:
        _shut_down_ray()


@pytest.fixture(scope="module", autouse=True)
def no_ray_outlives_its_module():
    """A module whose fixture failed half-way leaves no Ray behind to break the next ones."""
    yield
    if ray.is_initialized():
        _shut_down_ray()


def _shut_down_ray() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def served_app(overrides: dict, num_cpus: int) -> Iterator[str]:
    """The application of `overrides` ({"engine": ..., "serving": ...}) on a local Ray of
    `num_cpus` CPUs, on a free port; yields its base URL once /ready answers 200."""
    port = free_port()
    serving = {**overrides.get("serving", {}), "port": port}
    config = load_config(None, {**overrides, "serving": serving})
    with local_ray(num_cpus):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=config.serving.app_name, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base)
        yield base


def wait_until_ready(base: str, timeout_s: float = 120) -> None:
    """Until the application at `base` answers /ready with 200."""
    deadline = time.monotonic() + timeout_s
    while (reply := ready_reply(base)) is None or reply.status_code != 200:
        assert time.monotonic() < deadline, f"{base} never became ready"
        time.sleep(0.5)


def ready_reply(base: str) -> httpx.Response | None:
    """GET /ready, or None while nothing answers in time: until the ingress has a replica, Serve's
    proxy may hold a request instead of refusing it."""
    try:
        return httpx.get(f"{base}/ready", timeout=5)
    except httpx.TransportError:
        return None


@pytest.fixture(scope="session")
def local_app():
    """`served_app`, for module fixtures that serve an application."""
    return served_app


@pytest.fixture(scope="session")
def ready_probe():
    """`ready_reply`, for tests that wait for an application of their own."""
    return ready_reply


@pytest.fixture(scope="session")
def until_ready():
    """`wait_until_ready`, for tests that deploy an application of their own."""
    return wait_until_ready


@pytest.fixture(scope="session")
def ray_of():
    """`local_ray`, for fixtures that start a Ray of their own."""
    return local_ray
