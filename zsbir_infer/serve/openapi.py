"""The OpenAPI 3.1 description of the service (served at ``/openapi.json``, rendered offline at ``/docs``)."""

from __future__ import annotations

from typing import Any

from zsbir_infer import __version__


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*codes: int) -> dict[str, Any]:
    what = {
        400: "bad input (not an image, bad JSON, no query)",
        401: "a token is needed",
        404: "no such photo",
        413: "too many bytes or pixels",
        415: "unsupported content type",
        422: "bad parameter (k, domain, embedding)",
        503: "overloaded or not ready",
        504: "the search took too long",
    }
    return {str(c): _json(_ERROR, what[c]) for c in codes}


def spec() -> dict[str, Any]:
    """The OpenAPI document."""
    image_resp = {
        "description": "the image",
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
    }
    photo_id = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}]
    k_domain = [
        {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1, "default": 10}},
        {"name": "domain", "in": "query", "schema": {"type": "string", "enum": ["sketch", "photo"]}},
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "zsbir search service",
            "version": __version__,
            "description": "Zero-shot sketch-based image retrieval over an indexed photo gallery. Authentication "
            "(when the server has a token): 'Authorization: Bearer TOKEN'.",
        },
        "paths": {
            "/v1/search": {
                "post": {
                    "summary": "Search the gallery with a sketch (or a photo, or an embedding)",
                    "description": "Concurrent requests are embedded together (dynamic micro-batching). k and "
                    "domain may also be given as query parameters or form fields.",
                    "parameters": k_domain,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "image": {"type": "string", "format": "binary"},
                                        "k": {"type": "integer"},
                                        "domain": {"type": "string", "enum": ["sketch", "photo"]},
                                    },
                                    "required": ["image"],
                                }
                            },
                            "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
                        },
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/SearchResponse"}, "the best photos, best first"),
                        **_errors(400, 401, 413, 415, 422, 503, 504),
                    },
                }
            },
            "/v1/photos/{id}": {
                "get": {
                    "summary": "A photo of the gallery, by id",
                    "parameters": photo_id,
                    "responses": {"200": image_resp, **_errors(401, 404)},
                }
            },
            "/v1/photos/{id}/thumbnail": {
                "get": {
                    "summary": "A JPEG thumbnail of a photo (192 px longest side)",
                    "parameters": photo_id,
                    "responses": {"200": image_resp, **_errors(401, 404)},
                }
            },
            "/v1/info": {
                "get": {
                    "summary": "The gallery (as 'zsbir info --json') and the server's settings",
                    "responses": {"200": _json({"type": "object"}, "gallery and server description"), **_errors(401)},
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "alive")}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: the gallery can be read",
                    "responses": {"200": _json({"type": "object"}, "ready"), **_errors(503)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (requests, latency, batch sizes, gallery rows)",
                    "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}},
                }
            },
            "/": {"get": {"summary": "The sketch pad (HTML)", "responses": {"200": {"description": "HTML page"}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "SearchRequest": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "the image file, base64 (a data: URL is fine)"},
                        "embedding": {"type": "array", "items": {"type": "number"}},
                        "k": {"type": "integer", "minimum": 1, "default": 10},
                        "domain": {"type": "string", "enum": ["sketch", "photo"], "default": "sketch"},
                    },
                    "description": "exactly one of image or embedding",
                },
                "Hit": {
                    "type": "object",
                    "properties": {
                        "rank": {"type": "integer"},
                        "score": {"type": "number", "description": "cosine similarity"},
                        "id": {"type": "integer"},
                        "path": {"type": "string", "description": "relative to the photo folder"},
                        "thumbnail": {"type": "string", "description": "URL on this server"},
                        "photo": {"type": "string", "description": "URL on this server"},
                    },
                    "required": ["rank", "score", "id", "path", "thumbnail"],
                },
                "SearchResponse": {
                    "type": "object",
                    "properties": {
                        "hits": {"type": "array", "items": {"$ref": "#/components/schemas/Hit"}},
                        "k": {"type": "integer"},
                        "domain": {"type": "string"},
                        "model": {"type": "string", "description": "model fingerprint"},
                        "took_ms": {"type": "number"},
                    },
                    "required": ["hits", "model", "took_ms"],
                },
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
            },
        },
    }
