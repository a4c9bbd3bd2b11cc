"""The test kit itself: every tiny model loads through the real library path and runs, fast.

If these fail, every server test that loads a model fails for a reason that is not the server's,
so they check the artifacts in-process, with the same calls the server makes.
"""

from __future__ import annotations

import importlib
import inspect
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from kit import (
    CHECKPOINT_CLASS,
    MakeServer,
    ServerProcess,
    TinyModels,
    build_tiny_checkpoint,
    build_tiny_models,
)
from mymps_magic.cli.localserver import ServerStartError, free_port

if TYPE_CHECKING:
    from mymps_magic import Client

# The whole kit must stay cheap enough to build once per test session without anyone noticing;
# it takes about 3 s here, mostly importing torch, transformers and diffusers.
BUILD_BUDGET_S = 20.0


def test_kit_builds_every_artifact_into_a_fresh_dir(tmp_path: Path) -> None:
    started = time.perf_counter()
    models = build_tiny_models(tmp_path / "models")
    elapsed = time.perf_counter() - started

    assert elapsed < BUILD_BUDGET_S
    for path in (models.text_gpt2, models.text_llama, models.diffusion, models.auto):
        assert (path / "config.json").is_file() or (path / "model_index.json").is_file()
        assert path.parent == models.root
    for path in (models.torchscript, models.checkpoint, models.checkpoint_safetensors):
        assert path.is_file() and path.stat().st_size > 0
    assert models.checkpoint_class == CHECKPOINT_CLASS == "kitmodels:TinyNet"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_model_generates_tokens(tiny_models: TinyModels, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models.text_gpt2 if arch == "gpt2" else tiny_models.text_llama
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == arch

    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == 5
    assert isinstance(tokenizer.decode(new_tokens, skip_special_tokens=True), str)


def test_diffusion_pipeline_makes_pil_images_without_a_prompt(tiny_models: TinyModels) -> None:
    import torch
    from diffusers import DDPMPipeline, DiffusionPipeline
    from PIL import Image

    pipe = DiffusionPipeline.from_pretrained(tiny_models.diffusion)
    pipe.set_progress_bar_config(disable=True)

    # The server calls unconditional pipelines without a prompt; this one has no such parameter.
    assert isinstance(pipe, DDPMPipeline)
    assert "prompt" not in inspect.signature(pipe.__call__).parameters
    images = pipe(
        batch_size=2, num_inference_steps=2, output_type="pil", generator=torch.Generator().manual_seed(0)
    ).images

    assert len(images) == 2
    assert all(isinstance(image, Image.Image) and image.size == (8, 8) for image in images)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_maps_n_by_4_to_n_by_3(tiny_models: TinyModels) -> None:
    import torch

    module = torch.jit.load(str(tiny_models.torchscript))

    assert module(torch.zeros(5, 4, dtype=torch.float32)).shape == (5, 3)


def test_checkpoints_load_into_the_class_named_by_checkpoint_class(tiny_models: TinyModels) -> None:
    import torch
    from safetensors.torch import load_file

    module_name, class_name = tiny_models.checkpoint_class.split(":")
    model_class = getattr(importlib.import_module(module_name), class_name)
    from_pt, from_safetensors = model_class(), model_class()
    from_pt.load_state_dict(torch.load(tiny_models.checkpoint, weights_only=True), strict=True)
    from_safetensors.load_state_dict(load_file(str(tiny_models.checkpoint_safetensors)), strict=True)

    x = torch.ones(5, 4)
    assert from_pt(x).shape == (5, 2)
    assert torch.equal(from_pt(x), from_safetensors(x))


def test_builders_repeat_their_weights_and_leave_the_callers_rng_alone(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    _, first = build_tiny_checkpoint(tmp_path / "first")
    _, second = build_tiny_checkpoint(tmp_path / "second")

    assert torch.equal(torch.rand(3), expected_next)
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_auto_model_is_an_encoder_with_named_outputs(tiny_models: TinyModels) -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.auto)
    model = AutoModel.from_pretrained(tiny_models.auto)
    inputs = tokenizer("hello world", return_tensors="pt")

    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"}
    assert tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    output = model(**inputs)
    assert output.last_hidden_state.shape == (1, inputs["input_ids"].shape[1], 32)
    assert output.pooler_output.shape == (1, 32)


def test_free_port_can_be_bound() -> None:
    port = free_port()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_shared_server_answers_health_on_cpu(server: ServerProcess) -> None:
    answer = httpx.get(f"{server.url}/health")

    assert answer.status_code == 200
    assert answer.json()["device"] == "cpu"
    assert server.running and server.token
    assert server.token not in server.log_text()


def test_client_fixture_talks_to_the_shared_server(client: Client, server: ServerProcess) -> None:
    assert client.port == server.port
    assert client.health()["device"] == "cpu"
    assert isinstance(client.models(), list)  # needs the token: the fixture passed it on


def test_server_process_stops_and_restarts_on_the_same_port(make_server: MakeServer) -> None:
    process = make_server()
    port, token = process.port, process.token

    assert process.stop() is not None
    assert not process.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{process.url}/health")
    process.start()
    assert (process.port, process.token) == (port, token)
    assert httpx.get(f"{process.url}/health").status_code == 200


def test_server_start_failure_carries_the_log_tail(tmp_path: Path) -> None:
    process = ServerProcess(tmp_path / "home", options={"max_body": "lots"})

    with pytest.raises(ServerStartError) as failure:
        process.start()

    assert failure.value.returncode not in (None, 0)
    assert "lots" in str(failure.value)
    assert not process.running


def test_server_imports_the_checkpoint_class_from_tests(
    make_server: MakeServer, tiny_models: TinyModels
) -> None:
    process = make_server()

    answer = httpx.post(
        f"{process.url}/models/load",
        headers={"Authorization": f"Bearer {process.token}"},
        json={
            "name": "tinynet",
            "kind": "checkpoint",
            "path": str(tiny_models.checkpoint),
            "model_class": tiny_models.checkpoint_class,
        },
        timeout=60,
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "tinynet"
