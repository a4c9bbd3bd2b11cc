"""The plain Client inside a real Jupyter kernel, whose asyncio loop is already running."""

from __future__ import annotations

from notebook_kernel import Kernel
from kit import ServerProcess, TinyModels


def test_sync_client_and_streaming_work_in_a_kernel(kernel: Kernel, server: ServerProcess, tiny_models: TinyModels) -> None:
    setup = kernel.execute(
        "import asyncio\n"
        "from mymps_magic import Client\n"
        f"c = Client(port={server.port}, token={server.token!r})\n"
        f"c.load_model({str(tiny_models.text_gpt2)!r}, progress=False)\n"
        "print(asyncio.get_event_loop().is_running())\n"
    )
    assert setup.status == "ok", setup.error
    assert setup.stdout.strip() == "True", "the kernel's loop runs, as in a notebook"

    run = kernel.execute(
        f"pieces = list(c.stream_generate({str(tiny_models.text_gpt2)!r}, 'Once upon', max_new_tokens=8, temperature=0))\n"
        f"full = c.generate({str(tiny_models.text_gpt2)!r}, 'Once upon', max_new_tokens=8, temperature=0)['text']\n"
        "print(''.join(pieces) == full, c.health()['status'])\n"
    )
    assert run.status == "ok", run.error
    assert run.stdout.strip() == "True ok"


def test_run_cell_output_streams_into_the_kernel_cell(kernel: Kernel, server: ServerProcess) -> None:
    run = kernel.execute(
        "from mymps_magic import Client\n"
        f"c = Client(port={server.port}, token={server.token!r})\n"
        "value = c.run_cell('import time\\nprint(\"first\", flush=True)\\ntime.sleep(1)\\nprint(\"second\")\\n6 * 7')\n"
        "print('value', value)\n"
    )
    assert run.status == "ok", run.error
    streams = [(t, m["content"]["text"]) for t, m in run.messages if m["header"]["msg_type"] == "stream"]
    assert "".join(text for _, text in streams) == "first\nsecond\nvalue 42\n"
    first_at = next(t for t, text in streams if "first" in text)
    assert run.reply_at - first_at > 0.8, "the first line must reach the notebook while the remote code still runs"
