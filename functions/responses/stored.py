"""Stored responses: the request a response answers, under its owner, in Redis.

A record holds what the response was asked (its settings, the items of the chain before it and
its own input) and, once a reader has seen its job end, the finished response (`result`). Until
then the response is rendered from its job's stream, which is kept as long as the record
(`FERRY_RESPONSES_TTL_S`), so it survives a restart of any process.
"""

from __future__ import annotations

from typing import Any

from arq.connections import ArqRedis
from pydantic import BaseModel

from shared import keys
from shared.errors import NotFound
from shared.storage.objects import check_id


class ResponseRecord(BaseModel):
    id: str  # resp_<job id>
    job_id: str
    owner: str
    created_at: int
    model: str
    settings: dict[str, Any]  # what the response object echoes (`CreateResponse.echo`)
    context: list[dict[str, Any]] = []  # the chain's items before this request's input
    input: list[dict[str, Any]] = []
    result: dict[str, Any] | None = None  # the finished response object


async def save(redis: ArqRedis, record: ResponseRecord, ttl_s: int) -> None:
    await redis.set(keys.response(record.id), record.model_dump_json(), ex=ttl_s)


async def save_result(redis: ArqRedis, record: ResponseRecord, result: dict[str, Any]) -> None:
    """Keep the finished response, with the record's time to live left as it is."""
    record.result = result
    await redis.set(keys.response(record.id), record.model_dump_json(), keepttl=True, xx=True)


async def load(redis: ArqRedis, response_id: str, owner: str,
               param: str = "response_id") -> ResponseRecord:
    """The owner's response; 404 for another's, as for one that does not exist."""
    check_id(response_id, param)
    raw = await redis.get(keys.response(response_id))
    record = ResponseRecord.model_validate_json(raw) if raw is not None else None
    if record is None or record.owner != owner:
        raise NotFound(f"Response with id '{response_id}' not found.", param=param)
    return record


async def delete(redis: ArqRedis, record: ResponseRecord) -> None:
    await redis.delete(keys.response(record.id), keys.stream(record.job_id),
                       keys.job_meta(record.job_id))
