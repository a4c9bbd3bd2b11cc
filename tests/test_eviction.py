"""A load that does not fit (issue 14 item 4): the least recently used idle models make room,
``--no-evict`` turns that off, and what cannot fit is a 507 that says how much it needs and how
much is free, with the other models still loaded.

This machine has no GPU, so the tests cap the memory the server may give its models with the
real ``--memory-limit`` option and load copies of the tiny Llama, whose size they measure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kit import REPO_ROOT, MakeServer, ServerProcess, TinyModels, wait_for
from test_keep_alive import device_held, generate, in_thread, load, models, queued, rest

HUNGRY = "kitmodels.hungry:Hungry"


@pytest.fixture(scope="module")
def llama_bytes(server: ServerProcess, tiny_models: TinyModels) -> int:
    """What one tiny Llama takes once loaded, as ``/models`` reports it."""
    with rest(server) as http:
        load(http, "eviction-measure", tiny_models.text_llama)
        size = int(models(http)["eviction-measure"]["bytes"])
        http.delete("/models/eviction-measure")
    return size


def room_for(count: float, llama_bytes: int) -> str:
    """A --memory-limit that holds ``count`` tiny Llamas."""
    return f"{int(count * llama_bytes)}B"


def test_a_load_that_does_not_fit_unloads_the_least_recently_used_idle_models(
        make_server: MakeServer, tiny_models: TinyModels, llama_bytes: int) -> None:
    server = make_server(memory_limit=room_for(3.5, llama_bytes))
    with rest(server) as http:
        for name in ("a", "b", "c"):
            assert load(http, name, tiny_models.text_llama)["evicted"] == []
        generate(http, "a")
        generate(http, "b")  # least recent now: c, then a
        assert load(http, "d", tiny_models.text_llama)["evicted"] == ["c"]
        assert load(http, "e", tiny_models.text_llama)["evicted"] == ["a"]
        assert sorted(models(http)) == ["b", "d", "e"]
        assert http.get("/health").json()["status"] == "ok"
    assert "unloaded c" in server.log_text() and "evicted to make room for d" in server.log_text()


def test_a_model_a_queued_job_uses_is_never_evicted(make_server: MakeServer, tiny_models: TinyModels,
                                                     llama_bytes: int, tmp_path: Path) -> None:
    server = make_server(memory_limit=room_for(2.5, llama_bytes))
    with rest(server) as http:
        load(http, "wanted", tiny_models.text_llama)  # the least recently used...
        load(http, "idle", tiny_models.text_llama)
        with device_held(server, tmp_path):
            loading, loaded = in_thread(lambda: load(http, "new", tiny_models.text_llama))
            wait_for(lambda: queued(http, "load", "new"), "the load to queue")
            generating, generated = in_thread(lambda: generate(http, "wanted"))  # ...but queued for
            wait_for(lambda: queued(http, "generate", "wanted"), "the generation to queue")
        loading.join()
        generating.join()
        assert loaded[0]["evicted"] == ["idle"]
        assert generated[0]["tokens_generated"] == 2
        assert sorted(models(http)) == ["new", "wanted"]


def test_no_evict_refuses_the_load_with_a_507(make_server: MakeServer, tiny_models: TinyModels,
                                              llama_bytes: int) -> None:
    server = make_server(memory_limit=room_for(1.5, llama_bytes), no_evict=True)
    with rest(server) as http:
        load(http, "first", tiny_models.text_llama)
        answer = http.post("/models/load", json={"name": "second", "path": str(tiny_models.text_llama)})
        assert answer.status_code == 507
        message = answer.json()["error"]
        assert "\n" not in message
        assert re.match(r"loading second needs [\d.]+ KiB but [\d.]+ KiB is free on cpu \(--memory-limit", message)
        assert "--no-evict" in message
        assert list(models(http)) == ["first"]
        generate(http, "first")


def test_a_load_that_no_eviction_could_fit_is_a_507_and_unloads_nothing(
        make_server: MakeServer, tiny_models: TinyModels, llama_bytes: int) -> None:
    server = make_server(memory_limit=room_for(0.8, llama_bytes))
    with rest(server) as http:
        load(http, "half", tiny_models.text_llama, dtype="float16")
        answer = http.post("/models/load", json={"name": "whole", "path": str(tiny_models.text_llama),
                                                  "dtype": "float32"})
        assert answer.status_code == 507
        message = answer.json()["error"]
        assert re.match(r"loading whole needs [\d.]+ KiB but [\d.]+ KiB is free on cpu \(--memory-limit [\d.]+ KiB\); "
                        r"unloading every idle model would free only [\d.]+ KiB", message), message
        assert message.endswith("the other models stay loaded")
        assert list(models(http)) == ["half"]
        generate(http, "half")


def test_an_allocator_failure_is_a_507_that_says_how_much_was_asked(server: ServerProcess,
                                                                     tiny_models: TinyModels) -> None:
    """The class asks for 128 TiB while it is built: the allocator itself refuses (no estimate
    could see it coming), and the answer is still a 507 in one line, not a 500."""
    with rest(server) as http:
        before = sorted(models(http))
        answer = http.post("/models/load", json={"name": "eviction-hungry", "path": str(tiny_models.checkpoint),
                                                  "kind": "checkpoint", "model_class": HUNGRY})
        assert answer.status_code == 507, answer.text
        message = answer.json()["error"]
        assert "\n" not in message
        assert re.match(r"loading eviction-hungry needs 128\.0 TiB but [\d.]+ [KMG]iB is free on cpu;", message)
        assert "alloc_cpu" not in message
        assert sorted(models(http)) == before
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(("args", "env", "named"), [
    (["--memory-limit", "lots"], {}, "--memory-limit: 'lots' is not a size"),
    ([], {"MYMPS_MEMORY_LIMIT": "0"}, "MYMPS_MEMORY_LIMIT: the size must be positive"),
    ([], {"MYMPS_NO_EVICT": "maybe"}, "MYMPS_NO_EVICT='maybe': use 1 or 0"),
])
def test_bad_memory_settings_stop_the_start_in_one_line(tmp_path: Path, args: list[str], env: dict[str, str],
                                                         named: str) -> None:
    done = subprocess.run([sys.executable, "-m", "kernel_server", "--port", "0", "--home", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **env}, timeout=120)
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"mymps serve: {named}")


@pytest.mark.parametrize("failure", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 140737488355328 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GiB, other allocations: 1.00 GiB)"),
])
def test_the_allocators_failures_are_out_of_memory(failure: BaseException) -> None:
    """What torch's allocators raise on cpu and mps (cuda's is torch.OutOfMemoryError) maps to the 507."""
    from kernel_server.errors import as_server_error, is_out_of_memory

    assert is_out_of_memory(failure)
    assert as_server_error(failure).status == 507
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
