"""The README's "Cancelling by job id" example, run as written against a real server (issue 10,
item 21): it cancels a running generation, and it ends (with the call's own error) when the job
fails before it is ever listed, where the old ``while not c.jobs()`` loop spun forever.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from kit import REPO_ROOT, ServerProcess, TinyModels, never_ending_copy, wait_for
from test_session import wait_for_file

from mymps_magic import Client, NotFoundError

LLAMA = "readme-cancel-llama"
README_NAME = '"microsoft/phi-2"'
HUNG_S = 60  # the example ends in well under a second; this only tells "hung" from "slow"


def example() -> str:
    """The python block that follows the README's "Cancelling by job id" paragraph."""
    readme = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"^Cancelling by job id.*?```python\n(.*?)```", readme, re.S | re.M)
    assert found, "the README has a cancelling example"
    assert README_NAME in found.group(1)
    return found.group(1)


def run_example(c: Client, model: str) -> dict[str, Any]:
    """Run the example with ``model`` in place of the README's; returns what it printed or raised."""
    code = example().replace(README_NAME, repr(model))
    outcome: dict[str, Any] = {}

    def target() -> None:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "README.md", "exec"), {"c": c})  # noqa: S102  # the README's own code
        except Exception as exc:  # noqa: BLE001  # reported to the test
            outcome["raised"] = exc
        outcome["printed"] = out.getvalue()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HUNG_S)
    assert not thread.is_alive(), f"the README's cancel example did not end within {HUNG_S} s"
    return outcome


@pytest.fixture(scope="module")
def llama(server: ServerProcess, tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Its EOS unreachable: the random model sampled its EOS now and then before the cancel came.
    model = never_ending_copy(tiny_models.text_llama, tmp_path_factory.mktemp("cancel") / "llama")
    with Client(host="127.0.0.1", port=server.port, token=server.token) as c:
        c.load_model(LLAMA, path=str(model), progress=False)
        yield LLAMA
        c.unload_model(LLAMA)


def test_the_example_cancels_a_running_generation(client: Client, llama: str) -> None:
    outcome = run_example(client, llama)
    assert "raised" not in outcome, outcome
    assert outcome["printed"] == "cancelled\n"
    assert not [j for j in client.jobs() if j["model"] == llama]


def test_the_example_ends_when_the_job_fails_before_it_is_listed(client: Client) -> None:
    outcome = run_example(client, "readme-cancel-not-loaded")
    assert isinstance(outcome.get("raised"), NotFoundError), outcome
    assert "readme-cancel-not-loaded" in str(outcome["raised"])


def test_the_example_cancels_a_queued_generation(client: Client, llama: str, server: ServerProcess,
                                                 tmp_path: Path) -> None:
    """Another session holds the device, so the example finds its generation queued: the job is
    dropped before it runs, and the example still prints "cancelled" (it used to raise the
    call's CancelledError, which a busy machine showed now and then)."""
    release = tmp_path / "release"
    with Client(host="127.0.0.1", port=server.port, token=server.token) as other:
        holding = other.submit(wait_for_file, str(release), "held")
        wait_for(lambda: any(j["state"] == "running" for j in client.jobs()), "the other session's job running")
        outcome = run_example(client, llama)
        release.touch()
        assert holding.result(timeout=HUNG_S) == "held"
    assert "raised" not in outcome, outcome
    assert outcome["printed"] == "cancelled\n"
    assert not [j for j in client.jobs() if j["model"] == llama]
