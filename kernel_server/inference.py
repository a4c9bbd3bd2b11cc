"""Forward passes on raw tensors (``/infer``) and diffusion images (``/image``)."""

from __future__ import annotations

import base64
import inspect
import io
import random
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .errors import BadRequest, is_out_of_memory
from .registry import LoadedModel


def infer(loaded: LoadedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one forward pass; outputs come back as CPU numpy arrays (bfloat16 as float32).

    A single input is passed positionally (TorchScript and plain modules), several as keyword
    arguments (HuggingFace models: ``input_ids``, ``attention_mask``...). An input the model
    rejects (wrong shape or dtype) raises :class:`BadRequest` carrying the model's own message.
    """
    model = loaded.obj
    tensors = {name: _to_device(arr, loaded) for name, arr in inputs.items()}
    try:
        with torch.inference_mode():
            if len(tensors) == 1 and loaded.kind in ("torchscript", "checkpoint"):
                output = model(next(iter(tensors.values())))
            else:
                output = model(**tensors)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise BadRequest(f"model {loaded.name!r} rejected the input: {str(exc).strip().splitlines()[0][:400]}") from exc
    loaded.touch()
    return _outputs(output)


def _to_device(arr: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(arr, copy=True))
    if tensor.is_floating_point():
        tensor = tensor.to(loaded.dtype)
    return tensor.to(loaded.device if loaded.device != "cuda" else "cuda:0")


def _outputs(output: Any) -> dict[str, np.ndarray]:
    if isinstance(output, torch.Tensor):
        return {"output": _to_numpy(output)}
    if isinstance(output, dict):  # includes transformers' ModelOutput
        return {str(k): _to_numpy(v) for k, v in output.items() if isinstance(v, torch.Tensor)}
    if isinstance(output, (list, tuple)):
        return {f"output_{i}": _to_numpy(v) for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
    raise BadRequest(f"the model returned {type(output).__name__}, which has no tensors to send back")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def image(
    loaded: LoadedModel,
    prompt: str,
    steps: int,
    *,
    seed: int | None,
    guidance_scale: float | None,
    width: int | None,
    height: int | None,
    num_images: int,
    check_cancelled: Callable[[], None],
    on_progress: Callable[[float], None],
) -> dict[str, Any]:
    """Run a diffusers pipeline; images come back as base64 PNG.

    Only the arguments the pipeline accepts are passed, so unconditional pipelines (no prompt)
    work as well as text-to-image ones. Cancellation and progress ride on the pipeline's own
    ``progress_bar`` hook, which every ``DiffusionPipeline`` calls once per step.
    """
    pipe = loaded.obj
    seed = random.randrange(2**31) if seed is None else seed
    accepted = inspect.signature(pipe.__call__).parameters
    wanted: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "width": width,
        "height": height,
        "num_images_per_prompt": num_images,
        "batch_size": num_images,
        "output_type": "pil",
    }
    kwargs = {k: v for k, v in wanted.items() if v is not None and k in accepted}
    if "prompt" not in accepted and prompt:
        kwargs.pop("prompt", None)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs["generator"] = generator

    def progress_bar(iterable: Iterable[Any] | None = None, total: int | None = None) -> Iterator[Any]:
        items = list(iterable) if iterable is not None else list(range(total or 0))
        for i, item in enumerate(items):
            check_cancelled()
            yield item
            on_progress((i + 1) / max(1, len(items)))

    start = time.perf_counter()
    pipe.progress_bar = progress_bar
    try:
        result = pipe(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"pipeline {loaded.name!r} rejected the arguments: {exc}") from exc
    finally:
        del pipe.progress_bar
    loaded.touch()
    images = []
    for img in result.images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"images": images, "seed": seed, "time_s": round(time.perf_counter() - start, 4)}
