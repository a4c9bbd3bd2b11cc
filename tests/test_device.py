"""Device choice and memory figures; the mps branch runs against a fake ``mps`` device.

This machine has no Apple GPU, so ``torch.backends.mps.is_available`` and the ``torch.mps``
memory functions are replaced: the one stand-in the project allows. The server built on that
fake device is still the real app, served by uvicorn on a loopback port.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn

from kernel_server import Settings, create_app
from kernel_server.device import DeviceError, select_device
from mymps_magic.cli.localserver import free_port

GIB = 1024**3


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 3 * GIB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 5 * GIB)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * GIB)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: None)


def test_auto_prefers_mps_and_reads_its_memory_from_torch_mps(fake_mps: None) -> None:
    env: dict[str, str] = {}
    device = select_device("auto", env)
    assert device.kind == "mps"
    assert device.torch_device.type == "mps"
    assert device.memory() == {"allocated": 3 * GIB, "driver": 5 * GIB, "total": 21 * GIB}
    assert env["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert device.default_dtype() == torch.float16


def test_mps_keeps_the_users_fallback_choice(fake_mps: None) -> None:
    env = {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}
    select_device("mps", env)
    assert env["PYTORCH_ENABLE_MPS_FALLBACK"] == "0"


def test_auto_falls_back_to_cpu_with_system_ram() -> None:
    device = select_device("auto", {})
    assert device.kind == "cpu"  # no mps or cuda on this machine
    memory = device.memory()
    assert 0 < memory["allocated"] <= memory["total"]
    assert memory["total"] > 1 * GIB
    assert device.default_dtype() == torch.float32


def test_a_missing_device_is_refused_with_the_available_ones() -> None:
    with pytest.raises(DeviceError, match=r"'cuda' is not available here; available: cpu"):
        select_device("cuda", {})


@pytest.fixture
def mps_server(fake_mps: None) -> Iterator[str]:
    """The real app on the fake mps device, served by uvicorn in a thread."""
    port = free_port()
    settings = Settings(port=port)
    app = create_app(settings, token="t0ken", device=select_device("mps", {}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_server_on_mps_reports_the_device_memory(mps_server: str) -> None:
    health = httpx.get(f"{mps_server}/health").json()
    assert health["device"] == "mps"
    stats = httpx.get(f"{mps_server}/stats", headers={"Authorization": "Bearer t0ken"}).json()
    assert stats["device"]["kind"] == "mps"
    assert stats["device"]["allocated"] == 3 * GIB
    assert stats["device"]["driver"] == 5 * GIB
    assert stats["device"]["total"] == 21 * GIB
