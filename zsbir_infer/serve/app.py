"""The ASGI app: a thin HTTP layer over :class:`~zsbir_infer.retriever.Retriever` (see the package docstring)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import mimetypes
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zsbir_infer.retriever import Retriever
from zsbir_infer.serve.batching import MicroBatcher

__all__ = ["ApiError", "ServeConfig", "create_app"]

log = logging.getLogger("zsbir.serve")

TOKEN_COOKIE = "zsbir_token"
THUMB_SIZE = 192
MAX_K = 1000


@dataclass(frozen=True)
class ServeConfig:
    """Limits and options of the service (the ``zsbir serve`` options)."""

    token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_bytes: int = 10_000_000  # request bodies
    max_pixels: int = 25_000_000  # decoded query images
    max_k: int = MAX_K
    timeout_s: float = 30.0  # one search request
    read_timeout_s: float = 30.0  # each chunk of a request body
    max_queue: int = 1024
    cors_origins: tuple[str, ...] = ()
    thumb_cache: int = 1024


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get a JSON 413 (by Content-Length, or while they
    stream in); a body that stalls for ``read_timeout_s`` gets a 408."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    n = -1
                if n < 0 or n > self.max_bytes:
                    resp = _error(413, "too-large", f"request body over the limit of {self.max_bytes} bytes")
                    await resp(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            try:  # a client that stops sending its body mid-way does not hold the request open forever
                msg = await asyncio.wait_for(receive(), timeout=self.read_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(
                    408, "timeout", f"the request body did not arrive within {self.read_timeout_s:g} s"
                ) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "too-large", f"request body over the limit of {self.max_bytes} bytes")
            return msg

        await self.app(scope, limited, send)


class _Metrics:
    """Prometheus metrics in a registry of this app's own."""

    def __init__(self, rows: Callable[[], float]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zsbir_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "zsbir_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch = Histogram(
            "zsbir_search_batch_size",
            "Queries searched together (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_wait = Histogram(
            "zsbir_search_batch_wait_seconds",
            "Time the first query of a batch waited for the batch to fill",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=self.registry,
        )
        self.queries = Counter("zsbir_search_queries", "Search queries answered", ["kind"], registry=self.registry)
        rows_gauge = Gauge("zsbir_gallery_rows", "Searchable photos in the gallery", registry=self.registry)
        rows_gauge.set_function(rows)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))


class _Service:
    """State shared by the handlers: the retriever, the batcher, the id -> path map, the thumbnail cache."""

    def __init__(self, retriever: Retriever, config: ServeConfig, owns: bool) -> None:
        self.r = retriever
        self.config = config
        self.owns = owns
        self.started = time.time()
        self.metrics = _Metrics(self._rows)
        self.batcher = MicroBatcher(
            self._search,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            on_batch=self._on_batch,
        )
        self._paths: dict[int, str] = {}
        self._paths_identity: tuple[str, int] | None = None
        self._paths_full = False
        self._paths_lock = threading.Lock()
        self._thumbs: OrderedDict[tuple[int, str, int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    # -------------------------------------------------------------------------------- search

    def _rows(self) -> float:
        try:
            return float(self.r.gallery._live_count())
        except Exception:
            return math.nan

    def _on_batch(self, n: int, waited: float) -> None:
        self.metrics.batch.observe(n)
        self.metrics.batch_wait.observe(waited)

    def _search(self, queries: list[Any], k: int, domain: str) -> list[list[Any]]:
        # Decoding here, in the batch's one worker thread, rather than in a thread per request: fewer thread
        # hops, and no convoy of decoding threads starving the event loop under many clients.
        items = [_decode_image(q) if isinstance(q, _Encoded) else q for q in queries]
        rows = self.r.search(items, k=k, domain=domain)
        self._remember(rows)
        return rows

    def _remember(self, rows: list[list[Any]]) -> None:
        identity = self.r.gallery._identity()
        with self._paths_lock:
            if identity != self._paths_identity:
                self._paths, self._paths_identity, self._paths_full = {}, identity, False
            for row in rows:
                for h in row:
                    self._paths[h.id] = h.relpath

    def relpath(self, vid: int) -> str | None:
        """The photo of row ``vid`` (checked by the gallery to lie inside the photo folder), or None."""
        identity = self.r.gallery._identity()
        with self._paths_lock:
            if identity != self._paths_identity:
                self._paths, self._paths_identity, self._paths_full = {}, identity, False
            if vid in self._paths:
                return self._paths[vid]
            if self._paths_full:
                return None
            # A photo not seen in a search result: one pass over the catalog for this generation.
            self._paths = {i: rel for rel, i in self.r.gallery.indexed()}
            self._paths_full = True
            return self._paths.get(vid)

    def photo_file(self, vid: int) -> Path:
        """The file of row ``vid``, resolved and checked to lie inside the photo folder.

        Raises:
            ApiError: 404 when there is no such photo, or it is not inside the photo folder any more.
        """
        rel = self.relpath(vid)
        if rel is None:
            raise ApiError(404, "no-such-photo", f"no photo with id {vid} in this gallery")
        root = self.r.root
        if not root:
            raise ApiError(404, "no-photo-root", "this gallery does not record its photo folder")
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
            raise ApiError(404, "no-such-photo", f"photo {vid} lies outside the photo folder")
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(base, *parts))
        if os.path.commonpath([base, path]) != base:  # a symbolic link out of the photo folder
            raise ApiError(404, "no-such-photo", f"photo {vid} lies outside the photo folder")
        if not os.path.isfile(path):
            raise ApiError(404, "photo-missing", f"the file of photo {vid} is gone (rerun 'zsbir index')")
        return Path(path)

    def thumbnail(self, vid: int) -> bytes:
        from PIL import Image

        from zsbir_infer.preprocess import ImageDecodeError, load_image

        path = self.photo_file(vid)
        st = path.stat()
        key = (vid, str(path), st.st_size, st.st_mtime_ns)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            img = load_image(str(path), target_size=(THUMB_SIZE, THUMB_SIZE))
        except ImageDecodeError as exc:
            raise ApiError(404, "photo-unreadable", f"photo {vid} cannot be read: {exc}") from None
        img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.config.thumb_cache:
                self._thumbs.popitem(last=False)
        return data

    def info(self) -> dict[str, Any]:
        from zsbir_infer.indexer import read_indexer_info

        st = self.r.gallery.stats()
        ix = read_indexer_info(self.r.gallery.path)
        last = ix.get("last_run") or {}
        return {
            **asdict(st),
            "root": ix.get("root"),
            "model": ix.get("model"),
            "last_run": {k: v for k, v in last.items() if k != "skipped"} if last else None,
            "server": {
                "model_fingerprint": self.r.fingerprint,
                "encoder": self.r.encoder.describe(),
                "device": self.r.device,
                "max_batch": self.config.max_batch,
                "max_wait_ms": self.config.max_wait_ms,
                "max_bytes": self.config.max_bytes,
                "max_pixels": self.config.max_pixels,
                "max_k": self.config.max_k,
                "auth": self.config.token is not None,
                "uptime_s": round(time.time() - self.started, 1),
            },
        }


# ------------------------------------------------------------------------------------------ inputs


def _parse_k(value: Any, max_k: int) -> int:
    if value is None or value == "":
        return 10
    if isinstance(value, bool):
        raise ApiError(422, "bad-k", f"k must be an integer from 1 to {max_k}; got {value!r}")
    try:
        k = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        k = None
    if k is None or not 1 <= k <= max_k:
        raise ApiError(422, "bad-k", f"k must be an integer from 1 to {max_k}; got {value!r}")
    return k


def _parse_domain(value: Any) -> str:
    if value is None or value == "":
        return "sketch"
    if value not in ("sketch", "photo"):
        raise ApiError(422, "bad-domain", f"domain must be 'sketch' or 'photo'; got {value!r}")
    return str(value)


@dataclass(frozen=True)
class _Encoded:
    """An image file whose header was checked; decoded in the batch's worker thread."""

    data: bytes


def _check_image(data: bytes, max_pixels: int) -> _Encoded:
    """Check the header (format, pixel count) without decoding the pixels: cheap enough for the event loop."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "not-an-image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
    except UnidentifiedImageError:
        raise ApiError(400, "not-an-image", "the upload is not a recognised image file (PNG, JPEG, ...)") from None
    except Image.DecompressionBombError:
        raise ApiError(413, "too-many-pixels", f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:
        raise ApiError(400, "not-an-image", f"cannot read the image: {exc}") from None
    if w * h > max_pixels:
        raise ApiError(413, "too-many-pixels", f"the image has {w} x {h} pixels; at most {max_pixels} are accepted")
    if w == 0 or h == 0:
        raise ApiError(400, "not-an-image", "the image has no pixels")
    return _Encoded(data)


def _decode_image(item: _Encoded) -> Any:
    """The checked file -> an RGB PIL image (in a worker thread)."""
    from zsbir_infer.preprocess import ImageDecodeError, load_image

    try:
        return load_image(item.data)
    except ImageDecodeError as exc:
        raise ApiError(400, "not-an-image", str(exc).replace(f"<{len(item.data)} bytes>", "the image")) from None


def _parse_embedding(value: Any, dim: int) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ApiError(422, "bad-embedding", f"embedding must be a list of {dim} numbers")
    if len(value) != dim:
        raise ApiError(422, "bad-embedding", f"embedding has {len(value)} values; this gallery has dimension {dim}")
    v = np.asarray(value, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ApiError(422, "bad-embedding", "embedding contains NaN or infinity")
    if not np.any(v):
        raise ApiError(422, "bad-embedding", "embedding is all zeros")
    return v.astype(np.float32)


# ------------------------------------------------------------------------------------------ the app


def create_app(
    gallery: str | os.PathLike[str] | None = None,
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str = "auto",
    device: str = "cpu",
    config: ServeConfig | None = None,
    retriever: Retriever | None = None,
) -> Starlette:
    """The ASGI app over ``Retriever.open(gallery, model, backend, device)`` (or over ``retriever``, which is
    then not closed with the app). With no arguments (``uvicorn --factory zsbir_infer.serve:create_app``) the
    gallery is ``$ZSBIR_GALLERY`` or the nearest ``.zsbir``, and ``$ZSBIR_SERVE_TOKEN`` is the token."""
    if config is None:
        config = ServeConfig(token=os.environ.get("ZSBIR_SERVE_TOKEN") or None)
    owns = retriever is None
    r = retriever if retriever is not None else Retriever.open(gallery, model, backend=backend, device=device)
    svc = _Service(r, config, owns)
    from zsbir_infer.serve.page import docs_html, pad_html

    openapi_doc = _openapi()

    def authorized(request: Request) -> bool:
        if config.token is None:
            return True
        want = config.token.encode()
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), want):
            return True
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), want)

    def endpoint(
        name: str, public: bool = False
    ) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
        def wrap(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def handler(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    if not public and not authorized(request):
                        resp: Response = _error(
                            401,
                            "unauthorized",
                            "this server needs a token: send 'Authorization: Bearer TOKEN' (in a browser, open "
                            "/?token=TOKEN once)",
                            headers={"WWW-Authenticate": 'Bearer realm="zsbir"'},
                        )
                    else:
                        resp = await fn(request)
                except ApiError as exc:
                    resp = _error(exc.status, exc.code, exc.message)
                except OverflowError as exc:
                    resp = _error(503, "overloaded", str(exc), headers={"Retry-After": "1"})
                except Exception as exc:  # never a bare 500 page: a JSON error the client can read
                    log.exception("internal error in %s", name)
                    resp = _error(500, "internal", f"{type(exc).__name__}: {exc}")
                svc.metrics.requests.labels(name, str(resp.status_code)).inc()
                svc.metrics.latency.labels(name).observe(time.perf_counter() - t0)
                return resp

            return handler

        return wrap

    # ----------------------------------------------------------------------------- handlers

    @endpoint("search")
    async def search(request: Request) -> Response:
        t0 = time.perf_counter()
        svc.batcher.expect()
        submitted = False
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            params: dict[str, Any] = dict(request.query_params)
            query: Any
            if ctype == "multipart/form-data":
                try:
                    form = await request.form(max_files=1, max_fields=8, max_part_size=config.max_bytes)
                except ApiError:
                    raise
                except Exception as exc:
                    raise ApiError(400, "bad-form", f"cannot read the form: {exc}") from None
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise ApiError(400, "no-image", "the form needs a file field 'image'")
                for key in ("k", "domain"):
                    if isinstance(form.get(key), str):
                        params[key] = form.get(key)
                data = await upload.read()
                kind = "image"
            elif ctype in ("application/json", ""):
                body = await request.body()
                try:
                    doc = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    raise ApiError(400, "bad-json", "the body is not valid JSON") from None
                if not isinstance(doc, dict):
                    raise ApiError(400, "bad-json", "the body must be a JSON object")
                params.update({k: doc[k] for k in ("k", "domain") if k in doc})
                if ("image" in doc) == ("embedding" in doc):
                    raise ApiError(400, "no-query", "give exactly one of 'image' (base64) or 'embedding'")
                if "image" in doc:
                    if not isinstance(doc["image"], str):
                        raise ApiError(400, "not-an-image", "'image' must be a base64 string")
                    text = doc["image"]
                    if text.startswith("data:") and "," in text:
                        text = text.split(",", 1)[1]
                    try:
                        data = base64.b64decode(text, validate=True)
                    except (binascii.Error, ValueError):
                        raise ApiError(400, "not-an-image", "'image' is not valid base64") from None
                    kind = "image"
                else:
                    data = b""
                    kind = "embedding"
            else:
                raise ApiError(
                    415, "unsupported-media-type", "send multipart/form-data (field 'image') or application/json"
                )
            k = _parse_k(params.get("k"), config.max_k)
            domain = _parse_domain(params.get("domain"))
            if kind == "image":
                query = _check_image(data, config.max_pixels)
            else:
                query = _parse_embedding(doc["embedding"], r.gallery.dim)
            submitted = True
            try:
                hits = await asyncio.wait_for(svc.batcher.submit(query, k, domain), timeout=config.timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, "timeout", f"the search took longer than {config.timeout_s:g} s") from None
        finally:
            if not submitted:
                svc.batcher.cancel()
        svc.metrics.queries.labels(kind).inc()
        from zsbir_infer.gallery import display_path

        return JSONResponse(
            {
                "hits": [
                    {
                        "rank": h.rank,
                        "score": round(float(h.score), 6),
                        "id": h.id,
                        "path": display_path(h.relpath),
                        "thumbnail": f"/v1/photos/{h.id}/thumbnail",
                        "photo": f"/v1/photos/{h.id}",
                    }
                    for h in hits
                ],
                "k": k,
                "domain": domain,
                "model": r.fingerprint,
                "took_ms": round((time.perf_counter() - t0) * 1000.0, 2),
            }
        )

    def _photo_id(request: Request) -> int:
        vid = request.path_params["id"]
        if not isinstance(vid, int) or vid < 0:
            raise ApiError(404, "no-such-photo", "photo ids are non-negative integers")
        return vid

    @endpoint("photo")
    async def photo(request: Request) -> Response:
        path = await anyio.to_thread.run_sync(svc.photo_file, _photo_id(request))
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    @endpoint("thumbnail")
    async def thumbnail(request: Request) -> Response:
        data = await anyio.to_thread.run_sync(svc.thumbnail, _photo_id(request))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @endpoint("info")
    async def info(request: Request) -> Response:
        return JSONResponse(await anyio.to_thread.run_sync(svc.info))

    @endpoint("healthz", public=True)
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @endpoint("readyz", public=True)
    async def readyz(request: Request) -> Response:
        try:
            n = await anyio.to_thread.run_sync(r.gallery._live_count)
        except Exception as exc:
            return _error(503, "not-ready", f"the gallery cannot be read: {exc}")
        return JSONResponse({"status": "ready", "photos": int(n), "model": r.fingerprint})

    @endpoint("metrics")
    async def metrics(request: Request) -> Response:
        return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @endpoint("openapi")
    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_doc)

    @endpoint("docs", public=True)
    async def docs(request: Request) -> Response:
        return HTMLResponse(docs_html())

    @endpoint("pad", public=True)
    async def pad(request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None and config.token is not None:
            if not hmac.compare_digest(token.encode(), config.token.encode()):
                return _error(401, "unauthorized", "wrong token")
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return resp
        return HTMLResponse(pad_html(), headers={"Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        code = {404: "not-found", 405: "method-not-allowed"}.get(status, "error")
        return _error(status, code, str(detail))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error(exc.status, exc.code, exc.message)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await svc.batcher.aclose()
            if svc.owns:
                r.close()

    routes = [
        Route("/", pad, methods=["GET"]),
        Route("/v1/search", search, methods=["POST"]),
        Route("/v1/photos/{id:int}", photo, methods=["GET"]),
        Route("/v1/photos/{id:int}/thumbnail", thumbnail, methods=["GET"]),
        Route("/v1/info", info, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    middleware.append(Middleware(_BodyLimit, max_bytes=config.max_bytes, read_timeout_s=config.read_timeout_s))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: not_found, ApiError: api_error},
        lifespan=lifespan,
    )
    app.state.service = svc
    app.state.retriever = r
    return app


def _openapi() -> dict[str, Any]:
    from zsbir_infer.serve.openapi import spec

    return spec()
