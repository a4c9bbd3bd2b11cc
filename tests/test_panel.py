"""The ipywidgets panel (``%mymps status``, `Client.panel`) in a real kernel, on real servers.

The buttons are driven the way a click drives them, through the widgets' own handlers
(``button.click()`` in a cell), and what they did is checked over the server's HTTP API from
the test process. Refreshing is checked from inside cells: the panel's thread keeps working
while a cell runs, and stops when the panel is closed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from notebook_kernel import Kernel, ok
from kit import MakeServer, ServerProcess, TinyModels, auth, wait_for

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def value_of(kernel: Kernel, expression: str) -> Any:
    """A JSON-able expression's value in the kernel."""
    run = ok(kernel.execute(f"import json as _json\nprint(_json.dumps({expression}))"))
    return json.loads(run.stdout)


def until_in_kernel(kernel: Kernel, condition: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` inside one cell, so that the panel's thread has to work while it runs."""
    ok(kernel.execute(f"import time as _t\n_end = _t.monotonic() + {timeout}\n"
                      f"while not ({condition}):\n"
                      f"    assert _t.monotonic() < _end, {condition!r}\n"
                      f"    _t.sleep(0.05)", timeout=timeout + 30))


def model_names(server: ServerProcess) -> list[str]:
    answer = httpx.get(f"{server.url}/models", headers=auth(server.token), timeout=30, trust_env=False)
    return [m["name"] for m in answer.json()]


def job_ids(server: ServerProcess) -> list[str]:
    answer = httpx.get(f"{server.url}/jobs", headers=auth(server.token), timeout=30, trust_env=False)
    return [j["id"] for j in answer.json()["jobs"]]


def load(server: ServerProcess, name: str, path: str) -> None:
    body = {"name": name, "path": path, "kind": "text"}
    answer = httpx.post(f"{server.url}/models/load", json=body, headers=auth(server.token), timeout=120,
                        trust_env=False)
    assert answer.status_code == 200, answer.text


@pytest.mark.slow
def unload(server: ServerProcess, name: str) -> None:
    """Unload ``name`` (a path too: the route keeps its leading slash) unless it is not loaded."""
    if name in model_names(server):
        answer = httpx.delete(f"{server.url}/models/{name}", headers=auth(server.token), timeout=60, trust_env=False)
        assert answer.status_code == 200, answer.text


def test_status_shows_the_panel_with_memory_models_and_a_text_summary(
        nb: Kernel, server: ServerProcess, tiny_models: TinyModels) -> None:
    load(server, "panel-shown", str(tiny_models.text_llama))
    run = ok(nb.execute("%mymps status --interval 0.5"))
    data = run.of_type("display_data")[-1]["content"]["data"]
    assert WIDGET_VIEW in data, "the panel is a widget"
    text = data["text/plain"]
    assert text.startswith(f"Server  127.0.0.1:{server.port}  mymps "), text
    assert "ms round trip" in text and "panel-shown (" in text and "iB)" in text, text
    assert "allocated of" in text, text
    shown = value_of(nb, "[get_ipython().magics_manager.registry['MympsMagics'].panel.memory.value, "
                         "list(get_ipython().magics_manager.registry['MympsMagics'].panel.models.rows)]")
    assert "allocated of" in shown[0] and "iB" in shown[0], shown
    assert "panel-shown" in shown[1]
    row = value_of(nb, "[c.value for c in get_ipython().magics_manager.registry['MympsMagics']"
                       ".panel.models.rows['panel-shown'].cells]")
    assert row[:3] == ["panel-shown", "text", "float32"], row
    assert row[3].endswith("iB") and row[4].endswith(("ago", "just now")), row
    assert "{" not in "".join(row), "no raw JSON"
    # A second %mymps status replaces the first panel, which stops refreshing.
    ok(nb.execute("_first = get_ipython().magics_manager.registry['MympsMagics'].panel\n%mymps status"))
    assert value_of(nb, "_first._closed.is_set()") is True
    ok(nb.execute("get_ipython().magics_manager.registry['MympsMagics'].panel.close()"))
    httpx.delete(f"{server.url}/models/panel-shown", headers=auth(server.token), timeout=60, trust_env=False)


def test_status_refuses_an_interval_that_is_not_positive(nb: Kernel) -> None:
    run = nb.execute("%mymps status --interval 0")
    assert run.status == "error" and "--interval 0: give a positive number of seconds" in run.stderr, run.stderr


@pytest.mark.slow
def test_unload_and_load_buttons_act_on_the_server(nb: Kernel, server: ServerProcess,
                                                   tiny_models: TinyModels) -> None:
    load(server, "panel-unload-me", str(tiny_models.text_llama))
    ok(nb.execute("from mymps_magic import notebook_client\np = notebook_client().panel(interval=60)"))
    ok(nb.execute("p.models.rows['panel-unload-me'].button.click()"))
    wait_for(lambda: "panel-unload-me" not in model_names(server), "the Unload button to unload the model")
    until_in_kernel(nb, "'panel-unload-me' not in p.models.rows")  # the panel refreshed after acting

    path = str(tiny_models.text_llama)
    unload(server, path)  # if another test on the shared server left it loaded, the form would find it there
    ok(nb.execute(f"p.load_form.name.value = {path!r}\np.load_form.kind.value = 'text'\n"
                  "p.load_form.dtype.value = 'float32'\np.load_form.button.click()"))
    wait_for(lambda: path in model_names(server), "the Load button to load the model")
    until_in_kernel(nb, "'loaded (float32)' in p.load_form.message.value")
    assert value_of(nb, "[p.load_form.bar.value, p.load_form.bar.bar_style, p.load_form.button.disabled]") \
        == [1.0, "success", False]
    until_in_kernel(nb, f"{path!r} in p.models.rows")

    # A load the server refuses ends in the form and the error list, not in the kernel.
    ok(nb.execute("p.load_form.name.value = '/no/such/model'\np.load_form.kind.value = 'text'\n"
                  "p.load_form.button.click()"))
    until_in_kernel(nb, "p.load_form.message.value.startswith('failed: ')")
    until_in_kernel(nb, "any('load /no/such/model' in m for _, m in p.errors)")
    ok(nb.execute("p.close()"))
    unload(server, path)


@pytest.mark.slow
def test_cancel_buttons_cancel_a_queued_and_a_running_job(nb: Kernel, server: ServerProcess,
                                                          client: Any) -> None:
    running = client.submit(time.sleep, 60)
    queued = client.submit(time.sleep, 60)
    ids = wait_for(lambda: len(job_ids(server)) >= 2 and job_ids(server), "two jobs on the server")
    first, second = ids[0], ids[1]
    ok(nb.execute("from mymps_magic import notebook_client\np = notebook_client().panel(interval=60)"))
    assert set(value_of(nb, "list(p.jobs.rows)")) >= {first, second}
    ok(nb.execute(f"p.jobs.rows[{second!r}].button.click()"))
    wait_for(lambda: second not in job_ids(server), "the Cancel button to drop the queued job")
    ok(nb.execute(f"p.jobs.rows[{first!r}].button.click()"))
    wait_for(lambda: first not in job_ids(server), "the Cancel button to stop the running job")
    for future in (running, queued):
        with pytest.raises(BaseException):  # noqa: B017  # cancelled or interrupted, as the client words it
            future.result(timeout=60)
    until_in_kernel(nb, f"{first!r} not in p.jobs.rows")
    ok(nb.execute("p.close()"))


@pytest.mark.slow
def test_a_cell_runs_while_the_panel_refreshes_and_close_stops_it(nb: Kernel) -> None:
    ok(nb.execute("from mymps_magic import notebook_client\n"
                  "p = notebook_client().panel(interval=0.2)\nq = notebook_client().panel(interval=0.2)"))
    assert ok(nb.execute("40 + 2")).result == {"text/plain": "42"}
    # Within one running cell the panel's thread refreshes again and again.
    ok(nb.execute("_n = p.refreshes"))
    until_in_kernel(nb, "p.refreshes >= _n + 3")
    ok(nb.execute("p.close()\n_closed_at = p.refreshes\n_q = q.refreshes"))
    until_in_kernel(nb, "q.refreshes >= _q + 5")  # the open one went on: time enough for the closed one
    assert value_of(nb, "p.refreshes - _closed_at") == 0
    ok(nb.execute("q.close()"))


@pytest.mark.slow
def test_a_stopped_server_shows_disconnected_and_the_kernel_stays_usable(
        own_kernel: Callable[..., Kernel], make_server: MakeServer) -> None:
    other = make_server()
    kernel = own_kernel(MYMPS_SERVER_PORT=str(other.port), MYMPS_TOKEN=other.token)
    ok(kernel.execute("from mymps_magic import notebook_client\np = notebook_client().panel(interval=0.3)"))
    assert "connected" in value_of(kernel, "p.connection.value")
    other.stop()
    until_in_kernel(kernel, "'disconnected: ' in p.connection.value")
    reason = value_of(kernel, "p.errors[-1][1]")
    assert reason.startswith("disconnected: ") and f"127.0.0.1:{other.port}" in reason, reason
    assert ok(kernel.execute("6 * 7")).result == {"text/plain": "42"}
    assert value_of(kernel, "repr(p)").startswith("<mymps Panel of 127.0.0.1:")
    ok(kernel.execute("p.close()"))
