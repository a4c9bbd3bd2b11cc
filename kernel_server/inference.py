"""Forward passes on raw tensors (``/infer``) and diffusion images (``/image``)."""

from __future__ import annotations

import base64
import inspect
import io
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from mymps_magic import wire

from .errors import BadRequest, is_out_of_memory
from .progress import Steps
from .registry import LoadedModel


def infer(loaded: LoadedModel, inputs: dict[str, np.ndarray], native: bool = False) -> dict[str, np.ndarray]:
    """Run one forward pass; outputs come back as CPU numpy arrays, floating ones as float32 (as
    the original's did) unless ``native`` (then in the model's dtype; bfloat16 still as float32,
    which numpy lacks). Integer and bool outputs keep their dtype.

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
        raise BadRequest(f"model {loaded.name!r} rejected the input: {_model_message(exc)}") from exc
    loaded.touch()
    return _outputs(output, native)


def _model_message(exc: BaseException) -> str:
    """The model's own words: TorchScript wraps them in an interpreter traceback, last line last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:400]


def _to_device(arr: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(arr, copy=True))
    if tensor.is_floating_point():
        tensor = tensor.to(loaded.dtype)
    return tensor.to(loaded.device if loaded.device != "cuda" else "cuda:0")


def _outputs(output: Any, native: bool) -> dict[str, np.ndarray]:
    if isinstance(output, torch.Tensor):
        return {"output": _to_numpy(output, native)}
    if isinstance(output, dict):  # includes transformers' ModelOutput
        return {str(k): _to_numpy(v, native) for k, v in output.items() if isinstance(v, torch.Tensor)}
    if isinstance(output, (list, tuple)):
        return {f"output_{i}": _to_numpy(v, native) for i, v in enumerate(output) if isinstance(v, torch.Tensor)}
    raise BadRequest(f"the model returned {type(output).__name__}, which has no tensors to send back")


def _to_numpy(tensor: torch.Tensor, native: bool) -> np.ndarray:
    tensor = tensor.detach().to("cpu")
    if tensor.dtype == torch.bfloat16 or (tensor.is_floating_point() and not native):
        tensor = tensor.float()
    return tensor.numpy()


def image(
    loaded: LoadedModel,
    asked: wire.ImageRequest,
    *,
    check_cancelled: Callable[[], None],
    on_progress: Callable[[float], None],
) -> dict[str, Any]:
    """Run a diffusers pipeline; images come back as base64 PNG.

    Unconditional pipelines (DDPM) take no prompt and ignore it; an option a pipeline does not
    take (``width`` for DDPM) is refused rather than silently dropped. Cancellation and progress
    ride on the pipeline's own ``progress_bar`` hook, which every ``DiffusionPipeline`` calls.
    """
    pipe = loaded.obj
    seed = random.randrange(2**31) if asked.seed is None else asked.seed
    accepted = inspect.signature(pipe.__call__).parameters
    options = {"guidance_scale": asked.guidance_scale, "width": asked.width, "height": asked.height}
    kwargs: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    refused = [k for k in kwargs if k not in accepted]
    if refused:
        raise BadRequest(f"pipeline {loaded.name!r} ({type(pipe).__name__}) does not take {', '.join(refused)}")
    kwargs["num_inference_steps"] = asked.steps
    kwargs["output_type"] = "pil"
    if "prompt" in accepted:  # unconditional pipelines (DDPM) take no prompt and ignore it
        kwargs["prompt"] = asked.prompt
    count = "num_images_per_prompt" if "num_images_per_prompt" in accepted else "batch_size"
    if count in accepted:
        kwargs[count] = asked.num_images
    elif asked.num_images != 1:
        raise BadRequest(f"pipeline {loaded.name!r} makes one image per call; ask for num_images=1")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs["generator"] = generator

    def progress_bar(iterable: Iterable[Any] | None = None, total: int | None = None) -> Steps:
        return Steps(iterable, total, check_cancelled, on_progress)

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
