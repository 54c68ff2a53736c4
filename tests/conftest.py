"""Fixtures of the core tests (helpers to import are in support.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from support import RawUpstream


@pytest.fixture
async def raw_upstream():
    started: list[RawUpstream] = []

    async def start(respond: Callable[[bytes], bytes | None]) -> RawUpstream:
        upstream = await RawUpstream(respond).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()
