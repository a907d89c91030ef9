"""`/models`: the models workers have registered."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from functions.state import state
from shared import models

bp = Blueprint("models", __name__)


@bp.get("/models")
async def list_models() -> Any:
    records = await models.all_models(state().redis)
    return {"object": "list", "data": [r.public() for r in records]}


@bp.get("/models/<path:model_id>")
async def get_model(model_id: str) -> Any:
    return (await models.get(state().redis, model_id)).public()
