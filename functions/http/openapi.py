"""`/openapi.json`, generated from the models each handler declares, and Swagger UI beside it.

A handler states its request body, query and answer with `@operation(...)`; the document walks the
app's routes, so a route without a declaration is simply left out, and the schemas are pydantic's
own JSON Schema of the very models the handlers parse with. Swagger UI is served from the files
that the swagger-ui-py package ships, so the docs work with no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from quart import Blueprint, Quart, current_app, redirect, send_from_directory

from functions.http.schemas import ErrorResponse
from shared.errors import NotFound

bp = Blueprint("openapi", __name__)
F = TypeVar("F")

# Fields that Ferry keeps but never shows (a stored object's owner, a run's job).
HIDDEN = {"owner", "job_id"}
STREAM = "text/event-stream"
SWAGGER_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                 "favicon-32x32.png")


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type[BaseModel] | None = None
    form: type[BaseModel] | None = None  # a multipart/form-data body (an upload)
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    media: str | None = None  # another type the answer may come as (SSE, or text for /metrics)
    status: int = 200
    errors: type[BaseModel] = ErrorResponse  # the error shape (Anthropic's routes have their own)


def operation(summary: str, **details: Any) -> Any:
    """Declare a handler's request and answer for the OpenAPI document."""
    op = Operation(summary, **details)

    def mark(view: F) -> F:
        view.__ferry_operation__ = op  # type: ignore[attr-defined]
        return view

    return mark


def document(app: Quart) -> dict[str, Any]:
    ops: list[tuple[str, str, Operation]] = []
    for rule in app.url_map.iter_rules():
        op = getattr(app.view_functions[rule.endpoint], "__ferry_operation__", None)
        if op is None:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        ops += [(path, m.lower(), op) for m in sorted(rule.methods or ()) if m not in ("HEAD", "OPTIONS")]

    inputs = {m for _, _, op in ops for m in (op.body, op.form, op.query) if m is not None}
    outputs = {op.response for _, _, op in ops if op.response is not None} | \
        {op.errors for _, _, op in ops}
    refs, defs = models_json_schema(
        [(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs],
        ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    for schema in schemas.values():  # no request model has these fields, so every schema may lose them
        for field in HIDDEN & set(schema.get("properties", {})):
            del schema["properties"][field]
            schema["required"] = [f for f in schema.get("required", []) if f != field]

    paths: dict[str, dict[str, Any]] = {}
    for path, method, op in sorted(ops, key=lambda o: (o[0], o[1])):
        entry: dict[str, Any] = {
            "summary": op.summary,
            "tags": [_tag(path)],
            "operationId": f"{method}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
            "responses": {str(op.status): _answer(op, refs), "default": {
                "description": "An error, in OpenAI's shape" if op.errors is ErrorResponse
                else "An error, in Anthropic's shape",
                "content": {"application/json": {"schema": refs[(op.errors, "serialization")]}},
            }},
        }
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{([^}]+)}", path)]
        if op.query is not None:
            query = op.query.model_json_schema()
            params += [{"name": name, "in": "query", "required": name in query.get("required", []),
                        "schema": schema} for name, schema in query["properties"].items()]
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": refs[(op.body, "validation")]}}}
        if op.form is not None:
            entry["requestBody"] = {"required": True, "content": {
                "multipart/form-data": {"schema": refs[(op.form, "validation")]}}}
        paths.setdefault(path, {})[method] = entry

    return {
        "openapi": "3.1.0",
        "info": {"title": "Ferry", "version": "0.1.0", "description": (
            "OpenAI-compatible inference over local GGUF models, with Jan's models, threads, "
            "assistants and conversations. Every path under /v1 is also served under /api/v1. "
            "In server mode send 'Authorization: Bearer <JWT or API key>'.")},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }


def _answer(op: Operation, refs: dict[Any, Any]) -> dict[str, Any]:
    if op.status == 302:
        return {"description": "A redirect (Location)"}
    content: dict[str, Any] = {}
    if op.response is not None:
        content["application/json"] = {"schema": refs[(op.response, "serialization")]}
    if op.media == STREAM:  # each event: `data` is a JSON chunk, or [DONE] at the end
        content[STREAM] = {"schema": {"type": "object", "required": ["data"], "properties": {
            "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}
    elif op.media is not None:
        content[op.media] = {"schema": {"type": "string"}}
    return {"description": "OK", "content": content or {"application/json": {"schema": {"type": "object"}}}}


def _tag(path: str) -> str:
    parts = [p for p in path.split("/") if p and p not in ("v1", "api") and not p.startswith("{")]
    return parts[0] if parts else "root"


@bp.get("/openapi.json")
async def openapi_json() -> Any:
    doc = current_app.extensions.get("ferry_openapi")
    if doc is None:
        doc = current_app.extensions["ferry_openapi"] = document(current_app)
    return doc


@bp.get("/api/swagger/")
@bp.get("/api/swagger")
async def swagger_root() -> Any:
    return redirect("/api/swagger/index.html", 302)


@bp.get("/api/swagger/index.html")
async def swagger_index() -> Any:
    return SWAGGER_PAGE, 200, {"Content-Type": "text/html; charset=utf-8"}


@bp.get("/api/swagger/<name>")
async def swagger_file(name: str) -> Any:
    if name not in SWAGGER_FILES:
        raise NotFound("No such file")
    return await send_from_directory(str(resources.files("swagger_ui") / "static"), name)


SWAGGER_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Ferry API</title>
  <link rel="stylesheet" href="swagger-ui.css">
  <link rel="icon" type="image/png" href="favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="swagger-ui-bundle.js"></script>
  <script src="swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout", validatorUrl: null,
    });
  </script>
</body>
</html>
"""
