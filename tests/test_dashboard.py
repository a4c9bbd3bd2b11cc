"""`mymps dashboard` over HTTP: a real server, the real dashboard process, httpx as the page.

Every response the dashboard gives is checked for the server's token: it must stay on the
dashboard's side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashboardprocess import DashboardProcess
from kit import REPO_ROOT, ServerProcess, TinyModels, never_ending_copy
from mymps_magic import Client
from mymps_magic.cli.localserver import free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def page(dashboard: tuple[ServerProcess, DashboardProcess]) -> Iterator[httpx.Client]:
    """httpx as the dashboard's own page: same Origin, and every answer checked for the token."""
    server, process = dashboard

    def no_token(response: httpx.Response) -> None:
        response.read()
        assert server.token not in response.text
        assert all(server.token not in value for value in response.headers.values())

    with httpx.Client(base_url=process.url, headers={"Origin": process.url}, timeout=60, trust_env=False,
                      event_hooks={"response": [no_token]}) as http:
        yield http


@pytest.fixture
def server_client(dashboard: tuple[ServerProcess, DashboardProcess]) -> Iterator[Client]:
    server, _ = dashboard
    with Client(port=server.port, token=server.token) as client:
        yield client


def events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def test_load_shows_progress_and_the_page_shows_the_model(page: httpx.Client, server_client: Client,
                                                          tiny_models: TinyModels) -> None:
    name = str(tiny_models.text_gpt2)
    loaded = events(page, "/load", {"name": name, "kind": "text", "dtype": "float32"})
    assert any("progress" in event for event in loaded), loaded
    assert "done" in loaded[-1], loaded
    assert [model["name"] for model in server_client.models()] == [name]

    html = page.get("/").text
    assert name in html and "Unload" in html and "connected to" in html
    assert "iB /" in html  # the memory bar's "allocated / total" with units
    assert "just now" in html or "s ago" in html
    status = page.get("/status").text
    assert name in status and 'class="bar"' in status
    assert page.get("/static/dashboard.js").status_code == 200


def test_generation_streams_pieces_then_done(page: httpx.Client, server_client: Client,
                                             tiny_models: TinyModels, tmp_path: Path) -> None:
    gpt2 = never_ending_copy(tiny_models.text_gpt2, tmp_path / "tiny")
    server_client.load_model("tiny", path=str(gpt2), dtype="float32", progress=False)
    streamed = events(page, "/generate", {"model": "tiny", "prompt": "hello", "max_new_tokens": 12})
    pieces = [event["text"] for event in streamed if "text" in event]
    assert len(pieces) >= 2, streamed
    assert streamed[-1]["done"]["tokens_generated"] == 12
    missing = events(page, "/generate", {"model": "nothing-loaded", "prompt": "hello"})
    assert "error" in missing[-1] and "nothing-loaded" in missing[-1]["error"]
    assert "nothing-loaded" in page.get("/status").text  # the last errors


def test_unload_removes_the_model_on_the_server(page: httpx.Client, server_client: Client,
                                                tiny_models: TinyModels) -> None:
    server_client.load_model("tiny", path=str(tiny_models.text_gpt2), dtype="float32", progress=False)
    answer = page.post("/unload", json={"name": "tiny"})
    assert answer.status_code == 200, answer.text
    assert server_client.models() == []
    again = page.post("/unload", json={"name": "tiny"})
    assert again.status_code == 409 and "tiny" in again.json()["error"]
    assert page.post("/unload", json={}).status_code == 400


def test_cancel_drops_a_queued_job(page: httpx.Client, server_client: Client) -> None:
    running = server_client.submit(time.sleep, 3)
    server_client.submit(time.sleep, 0)
    deadline = time.monotonic() + 30
    while not any(job["state"] == "running" for job in server_client.jobs()):
        assert time.monotonic() < deadline, "the first call never started"
    job = next(job for job in server_client.jobs() if job["state"] == "queued")
    assert job["id"] in page.get("/status").text
    assert page.post("/cancel", json={"id": job["id"]}).status_code == 200
    assert job["id"] not in [listed["id"] for listed in server_client.jobs()]
    running.result(timeout=30)


def test_changes_from_another_site_are_refused(dashboard: tuple[ServerProcess, DashboardProcess],
                                              server_client: Client, tiny_models: TinyModels) -> None:
    _, process = dashboard
    server_client.load_model("tiny", path=str(tiny_models.text_gpt2), dtype="float32", progress=False)
    with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
        assert http.post("/unload", json={"name": "tiny"}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert http.post("/unload", json={"name": "tiny"}).status_code == 403  # no Origin at all
        assert http.get("/unload").status_code == 405
        rebound = http.get("/status", headers={"Host": f"evil.example:{process.port}"})
        assert rebound.status_code == 403 and "loopback" in rebound.text
    assert [model["name"] for model in server_client.models()] == ["tiny"]


@pytest.mark.parametrize(("args", "env", "names"), [
    (["--host", "0.0.0.0"], {}, "--host"),
    ([], {"MYMPS_DASH_HOST": "192.0.2.1"}, "MYMPS_DASH_HOST"),
])
def test_a_non_loopback_bind_needs_allow_remote(args: list[str], env: dict[str, str], names: str) -> None:
    import os

    done = subprocess.run([sys.executable, "-m", "mymps_magic.dashboard", *args], cwd=REPO_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert names in done.stderr and "--allow-remote" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_unreachable_server_shows_disconnected_with_the_reason(tmp_path: Path) -> None:
    with DashboardProcess(free_port(), "not-a-real-token", tmp_path / "home") as process:
        html = httpx.get(f"{process.url}/status", timeout=30, trust_env=False).text
    assert "disconnected from 127.0.0.1" in html
    assert "Cannot reach" in html and "Last errors" in html
    assert "not-a-real-token" not in html
