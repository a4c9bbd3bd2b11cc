"""The server runs its event loop on uvloop where it is installed (the ``server`` extra brings it),
and its start line in server.log says which loop it runs: uvloop wakes the loop from the device
worker without handing the GIL back and forth, which an empty remote cell notices
(``benchmarks/magic_overhead.py``)."""

from __future__ import annotations

import importlib.util

import pytest
from kit import ServerProcess, wait_for

from mymps_magic import Client


def test_the_server_runs_uvloop_and_its_start_line_says_so(server: ServerProcess, client: Client) -> None:
    if importlib.util.find_spec("uvloop") is None:
        pytest.fail("uvloop is not installed: `pip install -e .[server,test]` brings it")
    start = wait_for(lambda: next((line for line in (server.home / "server.log").read_text().splitlines()
                                   if "mymps server" in line), None), "the server's start line")
    assert start.endswith("event loop uvloop")
    # The process holds a uvloop loop: the server's (IPython's own, for top-level await, is asyncio's).
    assert client.run_cell("import asyncio, gc\nany(type(o).__module__.startswith('uvloop') for o in gc.get_objects() "
                           "if isinstance(o, asyncio.AbstractEventLoop))") is True
