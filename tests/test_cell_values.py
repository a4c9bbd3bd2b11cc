"""A cell's last value is shown, not moved (issue 12 item 1).

The server sends back the value's rich repr and keeps the object as ``_`` (``__``, ``___``);
plain data (numbers, strings, containers of them, numpy arrays, tensors where the client has
torch) also comes back as the value. Checked through `Client.run_cell`, in the normal kernel,
and in the light-client kernel (no torch), where a model or a tensor used to fail to unpickle.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from notebook_kernel import Kernel, ok
from kit import ServerProcess
from lightclient import LightVenv, light_notebook

from mymps_magic import Client, RemoteError, RemoteNameError, wire
from mymps_magic.display import RemoteValue


def test_plain_values_come_back_as_values(client: Client) -> None:
    assert client.run_cell("[1, 'a', b'x', None, True, 2.5, {'k': (1, 2)}]") == [
        1, "a", b"x", None, True, 2.5, {"k": (1, 2)}]
    array = client.run_cell("np.arange(3)")
    assert isinstance(array, np.ndarray) and array.tolist() == [0, 1, 2]
    tensor = client.run_cell("torch.arange(3)")  # this client has torch: the hello says so
    assert isinstance(tensor, torch.Tensor) and tensor.tolist() == [0, 1, 2]


def test_other_values_stay_on_the_server_and_show_their_repr(client: Client) -> None:
    device = client.run_cell("DEVICE")
    assert isinstance(device, RemoteValue) and not device.arrived
    assert repr(device) == "device(type='cpu')"
    assert device._repr_mimebundle_() == {"text/plain": "device(type='cpu')"}
    layer = client.run_cell("torch.nn.Linear(2, 3)")
    assert isinstance(layer, RemoteValue) and "Linear(in_features=2, out_features=3" in repr(layer)
    assert client.run_cell("type(_).__name__, type(__).__name__") == ("Linear", "device")
    fetched = layer.fetch()  # moving is explicit
    assert isinstance(fetched, torch.nn.Linear) and fetched.out_features == 3
    assert device.fetch() == torch.device("cpu")


def test_a_fetch_of_a_value_no_longer_kept_says_what_to_do(client: Client) -> None:
    old = client.run_cell("torch.nn.ReLU()")
    assert isinstance(old, RemoteValue)
    for n in range(3):  # three newer values push it out of _, __, ___
        client.run_cell(f"torch.nn.Identity({n})")
    with pytest.raises(RemoteNameError) as info:
        old.fetch()
    assert "no longer kept" in str(info.value) and "assign it to a name" in str(info.value)


def test_a_trailing_semicolon_hides_the_value(client: Client) -> None:
    assert client.run_cell("41 + 1") == 42
    assert client.run_cell("torch.nn.ReLU();") is None
    assert client.run_cell("_") == 42  # a hidden value is not kept as _ either, as in IPython


@pytest.mark.slow
def test_a_256_mib_module_as_the_last_value_does_not_travel(client: Client,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import mymps_magic._reader as reader

    received: list[wire.Frame] = []
    settle = reader.settle

    def recording(future: Any, frame: wire.Frame, source: Any = None) -> None:
        received.append(frame)
        settle(future, frame, source)

    monkeypatch.setattr(reader, "settle", recording)
    value = client.run_cell("big = torch.nn.Linear(8192, 8192)\nbig")
    assert isinstance(value, RemoteValue) and "in_features=8192" in repr(value)
    assert received[-1].type == "result" and received[-1].buffers == []
    assert sum(len(str(v)) for v in received[-1].fields.values()) < 10_000
    assert client.run_cell("_ is big") is True


# -- in real kernels ----------------------------------------------------------------------------


def _shown(kernel: Kernel, cell: str) -> dict[str, Any] | None:
    return ok(kernel.execute(cell)).result


def check_a_notebook_shows_remote_values(kernel: Kernel, model: str) -> None:
    device = _shown(kernel, "%%mymps\nDEVICE")
    assert device is not None and device["text/plain"] == "device(type='cpu')", device
    shown = _shown(kernel, f"%%mymps\nmodels[{model!r}]")
    assert shown is not None and "LlamaForCausalLM(" in shown["text/plain"], shown
    assert ok(kernel.execute("%%mymps\nprint(type(_).__name__)")).stdout == "LlamaForCausalLM\n"
    tensor = _shown(kernel, "%%mymps\ntorch.arange(3)")
    assert tensor is not None and tensor["text/plain"] == "tensor([0, 1, 2])", tensor
    hidden = ok(kernel.execute("%%mymps\ntorch.arange(3);"))
    assert hidden.result is None and hidden.stdout == ""


@pytest.mark.slow
def test_the_notebook_shows_a_remote_device_model_and_tensor(nb: Kernel, llama: str) -> None:
    check_a_notebook_shows_remote_values(nb, llama)


@pytest.fixture(scope="module")
def light_nb(light_client: LightVenv, server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Kernel]:
    with light_notebook(Path(tmp_path_factory.mktemp("light-values")), light_client, server) as kernel:
        yield kernel


@pytest.mark.slow
def test_the_light_client_shows_what_it_cannot_unpickle(light_nb: Kernel, llama: str) -> None:
    assert "torch" not in ok(light_nb.execute("import importlib.util\n"
                                              "print(importlib.util.find_spec('torch'))")).stdout.replace("None", "")
    check_a_notebook_shows_remote_values(light_nb, llama)
    run = ok(light_nb.execute(
        "from mymps_magic import Client\nc = Client()\nt = c.run_cell('torch.arange(3)')\n"
        "print(type(t).__name__, t.arrived, repr(t))\nprint(c.run_cell('[1, 2.5]'))\n"
        "print(type(t.fetch()).__name__)"))
    assert run.stdout == "RemoteValue False tensor([0, 1, 2])\n[1, 2.5]\nndarray\n", run.stdout


def test_a_reset_frees_the_kept_values_at_once(client: Client) -> None:
    """Only the namespace holds a cell's value (not the shell, nor IPython's output history or
    last traceback), so emptying it frees a big value without waiting for the cyclic collector."""
    client.run_cell("import gc, weakref\ngc.disable()\nclass Big:\n    pass\nbig = Big()\nbig")
    client.run_cell("def fails(x):\n    raise ValueError('no')")
    with pytest.raises(RemoteError):
        client.run_cell("fails(big)")
    client.run_cell("import builtins\nbuiltins.mymps_probe = weakref.ref(big)\ndel big")
    try:
        client.reset()
        assert client.run_cell("import builtins\nbuiltins.mymps_probe() is None") is True
    finally:
        client.run_cell("import builtins, gc\ndel builtins.mymps_probe\ngc.enable()")
