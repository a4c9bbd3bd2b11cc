"""The server shell's short cut past IPython's input transformers (``shell.RemoteShell.transform_cell``)
must give each cell the code IPython would: a cell it wrongly lets past would lose its ``!cmd``,
``%magic`` or pasted prompt, and a cell it wrongly transforms is only slower."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from kernel_server.shell import RemoteShell

CELLS = [
    "pass", "x = 1\nx", "x = 1\ny = 2\n", "print('a')", "'100%'", "a = b ? c", "x = 5 % 3",
    "!echo hi", "files = !ls\nfiles", "%who", "%%time\n1", "x = %pwd", "len?", "pwd", "cd /tmp", "exit",
    "\n\n1/0", "  5", "\t5", ">>> 1 + 1", ">>> x = 1\n... x", "In [1]: 2 + 2", "   ...: 3", "...",
    "...: 3", "x = 1\n...: y", "x = [\n... 1]",
    ",print a b", ";print a b", "/print 1", "def f():\n    return 1\n/ 2", "x = (1,\n     2)",
    "import asyncio\nawait asyncio.sleep(0)", "async def f():\n    pass", "x = 1;", "1\r2", "",
]


@pytest.fixture(scope="module")
def shells() -> tuple[RemoteShell, RemoteShell]:
    """A shell with the short cut, and one of the same class without it (IPython's own method)."""

    class Plain(RemoteShell):
        transform_cell = InteractiveShell.transform_cell

    return RemoteShell({}, []), Plain({}, [])


@pytest.mark.parametrize("cell", CELLS)
def test_a_cell_is_transformed_as_ipython_transforms_it(shells: tuple[RemoteShell, RemoteShell], cell: str) -> None:
    fast, plain = shells
    assert fast.transform_cell(cell) == plain.transform_cell(cell)
