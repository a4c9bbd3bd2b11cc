"""The server shell's short cut past IPython's top-level-await check (``shell.RemoteShell.should_run_async``)
must decide as IPython does: a cell it wrongly took as synchronous could not ``await`` at its top
level, and one it wrongly sends to IPython's check is only slower."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from kernel_server.shell import RemoteShell
from mymps_magic import Client

CELLS = [
    "pass", "x = 1\nx", "import asyncio\nawait asyncio.sleep(0)", "async def f():\n    return 1",
    "async def f():\n    return 1\nawait f()", "async for x in y:\n    pass", "async with y:\n    pass",
    "[x async for x in y]", "x = 'await'", "# await in a comment", "def f():\n    await = 1", "",
]


@pytest.fixture(scope="module")
def shells() -> tuple[RemoteShell, RemoteShell]:
    """A shell with the short cut, and one of the same class without it (IPython's own method)."""

    class Plain(RemoteShell):
        should_run_async = InteractiveShell.should_run_async

    return RemoteShell({}, []), Plain({}, [])


@pytest.mark.parametrize("cell", CELLS)
def test_a_cell_runs_async_exactly_when_ipython_would_run_it_so(shells: tuple[RemoteShell, RemoteShell],
                                                                  cell: str) -> None:
    fast, plain = shells
    code = fast.transform_cell(cell)
    assert fast.should_run_async(cell, transformed_cell=code) == plain.should_run_async(cell, transformed_cell=code)


def test_a_remote_cell_still_awaits_at_its_top_level(client: Client) -> None:
    assert client.run_cell("import asyncio\nasync def twice(x):\n    await asyncio.sleep(0)\n    return 2 * x\n"
                           "await twice(21)") == 42
