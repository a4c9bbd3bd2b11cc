"""The original mymps README's example, with only its import line changed, against a real server.

The model is a tiny local one instead of ``microsoft/phi-2`` (nothing can be downloaded here), and
the server's address and token come from the environment, as they would for a user.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from kit import REPO_ROOT, MakeServer, TinyModels

ORIGINAL_EXAMPLE = '''
from mymps_magic import MympsClient

client = MympsClient()  # connects to localhost:5555

# check server
client.health()

# load a model onto MPS
client.load_model("{model}")

# generate text
result = client.generate("{model}", "The meaning of life is", max_new_tokens=64)
print(result["text"])

# streaming generation
import asyncio

async def stream():
    async with client.stream_generate("{model}", "Write a poem:\\n") as s:
        async for token in s:
            print(token, end="", flush=True)

asyncio.run(stream())

# cleanup
client.unload_model("{model}")
client.close()
'''


def test_the_original_readme_example_runs_with_only_the_import_changed(
    make_server: MakeServer, tiny_models: TinyModels
) -> None:
    server = make_server()  # its own: the example loads float16, which another test's float32 load would refuse
    model = str(tiny_models.text_llama)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYMPS_")}
    env.update({"MYMPS_SERVER_PORT": str(server.port), "MYMPS_TOKEN": server.token, "PYTHONPATH": str(REPO_ROOT)})

    done = subprocess.run([sys.executable, "-c", ORIGINAL_EXAMPLE.format(model=model)], env=env,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the generated and streamed text is printed"
    assert "Traceback" not in done.stderr
    # the example unloaded its model: the server no longer lists it
    assert model not in httpx.get(f"{server.url}/health", trust_env=False).json()["models"]
