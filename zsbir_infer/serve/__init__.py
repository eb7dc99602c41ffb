"""``zsbir serve``: an HTTP search service over :class:`~zsbir_infer.retriever.Retriever`, with a sketch pad.

The ASGI app (Starlette) is made by :func:`create_app`; ``zsbir serve`` runs it on uvicorn, and any ASGI
server can run it as a factory (``uvicorn --factory zsbir_infer.serve:create_app``, gallery from
``$ZSBIR_GALLERY`` or the nearest ``.zsbir``). Routes:

* ``POST /v1/search``: multipart field ``image``, or JSON ``{"image": base64}`` / ``{"embedding": [...]}``;
  ``k`` (default 10) and ``domain`` (``sketch`` | ``photo``) as query parameters, form fields or JSON keys.
  Answers ``{"hits": [{"rank", "score", "id", "path", "thumbnail", "photo"}], "model", "took_ms"}``.
* ``GET /v1/photos/{id}`` and ``/v1/photos/{id}/thumbnail``: photos of the gallery by row id only; the file
  is resolved below the photo folder and refused when it (or a symbolic link on the way) leads outside it.
* ``GET /v1/info`` (the gallery's ``zsbir info``), ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus),
  ``/openapi.json`` and ``/docs`` (rendered by the page itself: works offline), ``/`` (the sketch pad).

Concurrent searches are embedded together (:class:`~zsbir_infer.serve.batching.MicroBatcher`). A running
server sees what a later ``zsbir index`` committed on its next search (the gallery's generation). Bad input
is a JSON 4xx (``{"error": {"code", "message"}}``), never a 500. With a token every route but ``/``,
``/docs``, ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer TOKEN`` (or the cookie that
``/?token=TOKEN`` sets for the browser). Starlette, uvicorn and prometheus_client are the ``serve`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zsbir_infer.serve.app import ApiError, ServeConfig, create_app

__all__ = ["ApiError", "ServeConfig", "create_app", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def __getattr__(name: str) -> Any:
    if name in ("ApiError", "ServeConfig", "create_app"):
        from zsbir_infer.serve import app

        return getattr(app, name)
    raise AttributeError(name)
