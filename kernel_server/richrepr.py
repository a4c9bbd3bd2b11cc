"""Mimebundles of Python objects, as IPython would make them, without needing IPython here.

A notebook shows what it gets in the richest form it knows, so each object is offered as every
type it can give: PIL images and matplotlib figures as PNG, objects with ``_repr_*_`` methods
(pandas, rich, HTML helpers) as those, and always ``text/plain``.
"""

from __future__ import annotations

import base64
import io
import sys
from typing import Any

MimeBundle = dict[str, Any]

_REPR_METHODS = {
    "_repr_html_": "text/html",
    "_repr_markdown_": "text/markdown",
    "_repr_svg_": "image/svg+xml",
    "_repr_png_": "image/png",
    "_repr_jpeg_": "image/jpeg",
    "_repr_latex_": "text/latex",
    "_repr_json_": "application/json",
}


def _png_of_pil(obj: Any) -> str | None:
    pil = sys.modules.get("PIL.Image")
    if pil is None or not isinstance(obj, pil.Image):
        return None
    buf = io.BytesIO()
    obj.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png_of_figure(obj: Any) -> str | None:
    figure = sys.modules.get("matplotlib.figure")
    if figure is None or not isinstance(obj, figure.Figure):
        return None
    buf = io.BytesIO()
    obj.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mimebundle(obj: Any) -> tuple[MimeBundle, dict[str, Any]]:
    """The ``(data, metadata)`` a Jupyter ``display_data`` message would carry for ``obj``.

    Binary types are base64 strings, as in Jupyter messages; a ``_repr_*_`` method that raises is
    skipped, like IPython skips a failing formatter.
    """
    data: MimeBundle = {}
    metadata: dict[str, Any] = {}
    png = _png_of_pil(obj) or _png_of_figure(obj)
    if png is not None:
        data["image/png"] = png
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method):
        try:
            bundle = method()
        except Exception:
            bundle = None
        if isinstance(bundle, tuple):
            bundle, meta = bundle
            metadata.update(meta or {})
        if isinstance(bundle, dict):
            data.update(bundle)
    for name, mime in _REPR_METHODS.items():
        method = getattr(obj, name, None)
        if mime in data or not callable(method) or isinstance(obj, type):
            continue
        try:
            value = method()
        except Exception:
            continue
        if isinstance(value, tuple):
            value, meta = value
            metadata[mime] = meta
        if value is None:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        data[mime] = value
    data.setdefault("text/plain", _plain(obj))
    return data, metadata


def _plain(obj: Any) -> str:
    try:
        return repr(obj)
    except Exception as exc:  # a broken __repr__ must not lose the rest of the output
        return f"<{type(obj).__name__} object; repr failed: {exc}>"
