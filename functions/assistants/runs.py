"""`/threads/{id}/runs`: the thread's assistant answers, through the same queue as completions.

The worker stores the reply in the thread (and completes the run) itself, so the answer is kept
even when the client or this web process goes away mid-run. A run is not tied to a connection:
it is stopped by `POST .../cancel`, not by a disconnect.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint

from functions.assistants.protocol import ListParams, RunCreate, SubmitToolOutputs
from functions.assistants.threads import owned_thread
from functions.context import caller, state
from functions.http import schemas as r
from functions.http import sse
from functions.http.body import parse_body, parse_query
from functions.http.openapi import STREAM, operation
from functions.http.sse import Event
from functions.openai.protocol import ToolDef, tools_for_job
from functions.openai.tokenize import tokenizer
from functions.queue.handle import job_lost, request_cancel
from functions.queue.reader import JobStream
from functions.queue.submit import JobMeta, submit
from shared.errors import FerryError, InvalidRequest, NotFound
from shared.jobs import GenerationJob, Reply, Sampling, ToolCallDelta
from shared.registry import models
from shared.storage import store
from shared.storage.objects import FINISHED, Assistant, Message, Run, Thread, check_id, new_id, now

bp = Blueprint("runs", __name__)

MESSAGE_OVERHEAD = 8  # template tokens around each message (role markers, separators)
DEFAULT_RESERVE = 512  # tokens kept free for the answer when a run names no limit


@bp.post("/threads/<thread_id>/runs")
@operation("Run an assistant on a thread", body=RunCreate, response=Run, media=STREAM)
async def create(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    body = await parse_body(RunCreate)
    assistant = await _assistant(body.assistant_id or thread.assistant_id)
    record = await _model(body.model or thread.model or assistant.model
                          or state().settings.default_model)
    instructions = "\n\n".join(
        t for t in (body.instructions or assistant.instructions, body.additional_instructions) if t
    ) or None
    tools = body.tools if body.tools is not None else [ToolDef.model_validate(t)
                                                       for t in assistant.tools]
    choice = body.tool_choice or "auto"
    tools_for_job(tools, choice if tools else None, body.parallel_tool_calls)  # 400s come now
    run = Run(id=new_id("run"), owner=caller(), thread_id=thread.id, assistant_id=assistant.id,
              model=record.id, instructions=instructions, job_id="", metadata=body.metadata,
              tools=[t.model_dump(exclude_none=True) for t in tools],
              tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
              parallel_tool_calls=body.parallel_tool_calls, temperature=body.temperature,
              top_p=body.top_p, max_completion_tokens=body.max_completion_tokens)
    await store.create_run(state().redis, run)
    return await _generate(run, thread, assistant, record, body.stream)


@bp.post("/threads/<thread_id>/runs/<run_id>/submit_tool_outputs")
@operation("Give a run the results of the tools it called", body=SubmitToolOutputs, response=Run,
           media=STREAM)
async def submit_tool_outputs(thread_id: str, run_id: str) -> Any:
    thread = await owned_thread(thread_id)
    run = await _owned_run(thread_id, run_id)
    body = await parse_body(SubmitToolOutputs)
    if run.status != "requires_action" or run.required_action is None:
        raise InvalidRequest(f"Runs in status '{run.status}' do not accept tool outputs",
                             param="run_id")
    asked = [c["id"] for c in run.required_action["submit_tool_outputs"]["tool_calls"]]
    given = [o.tool_call_id for o in body.tool_outputs]
    if sorted(given) != sorted(asked):
        raise InvalidRequest(f"Expected one output for each of the calls {asked}, got {given}",
                             param="tool_outputs")
    turns = [{"role": "tool", "tool_call_id": o.tool_call_id, "content": o.output}
             for o in body.tool_outputs]
    run = await store.update_run(state().redis, run.id, status="queued", required_action=None,
                                 tool_turns=run.tool_turns + turns) or run
    if run.status != "queued":  # cancelled meanwhile
        raise InvalidRequest(f"Runs in status '{run.status}' do not accept tool outputs",
                             param="run_id")
    return await _generate(run, thread, await _assistant(run.assistant_id),
                           await _model(run.model), body.stream)


async def _generate(run: Run, thread: Thread, assistant: Assistant, record: models.ModelRecord,
                    stream: bool) -> Any:
    """Queue the run's next answer: to the thread, then to this run's calls and their results.
    The worker stores a text answer as the thread's message, or calls as `requires_action`."""
    st = state()
    message_id = new_id("msg")
    # A forced or required tool choice holds for the run's first answer; after the results it
    # is the model's turn to answer or call again (else a run could never complete).
    choice = run.tool_choice if not run.tool_turns or run.tool_choice == "none" else "auto"
    job = GenerationJob(
        id=new_id("job"), model=record.id, kind="chat",
        messages=await _prompt(thread, run.instructions, record, run.max_completion_tokens)
        + run.tool_turns,
        sampling=_sampling(assistant, run),
        tools=tools_for_job([ToolDef.model_validate(t) for t in run.tools],
                            choice if run.tools else None, run.parallel_tool_calls),
        reply=Reply(thread_id=thread.id, owner=thread.owner, assistant_id=assistant.id,
                    run_id=run.id, message_id=message_id),
        session=thread.id,
    )
    run = await store.update_run(st.redis, run.id, job_id=job.id) or run
    meta = JobMeta(id=job.id, kind="chat", model=record.id, created=int(time.time()))
    try:
        await submit(st.redis, job, meta, st.settings)
    except FerryError as e:
        await store.update_run(st.redis, run.id, status="failed", failed_at=now(),
                               last_error={"code": e.code, "message": e.message})
        raise
    run = await store.update_run(st.redis, run.id, when={"queued"}, status="in_progress",
                                 started_at=run.started_at or now()) or run
    if not stream:
        return run.public()
    events = JobStream(st.redis, st.streams, job.id, record.id, st.settings,
                       cancel_on_exit=False)
    return await sse.respond_after_first(
        _events(run, message_id, events), st.settings.keepalive_s,
        done=Event("[DONE]", name="done"), error_name="error",
    )


@bp.get("/threads/<thread_id>/runs")
@operation("List a thread's runs", query=ListParams, response=r.Page[Run])
async def list_runs(thread_id: str) -> Any:
    thread = await owned_thread(thread_id)
    return await store.list_runs(state().redis, thread, **parse_query(ListParams).paging())


@bp.get("/threads/<thread_id>/runs/<run_id>")
@operation("Get a run", response=Run)
async def get(thread_id: str, run_id: str) -> Any:
    return (await _checked(await _owned_run(thread_id, run_id))).public()


@bp.post("/threads/<thread_id>/runs/<run_id>/cancel")
@operation("Cancel a run", response=Run)
async def cancel(thread_id: str, run_id: str) -> Any:
    st = state()
    run = await _owned_run(thread_id, run_id)
    if run.status == "requires_action":  # nothing runs: it ends now
        run = await store.update_run(st.redis, run.id, status="cancelled", cancelled_at=now(),
                                     required_action=None) or run
    elif run.status not in FINISHED:
        await request_cancel(st.redis, run.job_id, st.settings)
        run = await store.update_run(st.redis, run.id, status="cancelling") or run
    return run.public()


async def _events(run: Run, message_id: str, stream: JobStream) -> AsyncIterator[Event | None]:
    """OpenAI's assistant stream events around the tokens of one reply."""
    redis = state().redis
    yield Event(run.public(), name="thread.run.created")
    yield Event(run.public(), name="thread.run.in_progress")
    try:
        async with stream:
            async for item in stream:
                if item is None:
                    yield None
                elif (call := item[1].tool_call) is not None:
                    yield Event(_step_delta(stream.job_id, call), id=item[0],
                                name="thread.run.step.delta")
                elif item[1].text:
                    text = {"index": 0, "type": "text", "text": {"value": item[1].text}}
                    yield Event({"id": message_id, "object": "thread.message.delta",
                                 "delta": {"content": [text]}}, id=item[0],
                                name="thread.message.delta")
        done = await store.get(redis, Run, run.id, run.owner)
        if done.status != "requires_action":
            thread = await store.get(redis, Thread, run.thread_id, run.owner)
            message = await store.get_message(redis, thread, message_id)
            yield Event(message.public(), name="thread.message.completed")
    except FerryError as e:  # cancelled or failed: the worker has recorded it on the run
        yield Event(e.to_dict(), name="error")
    done = await store.get(redis, Run, run.id, run.owner)
    yield Event(done.public(), name=f"thread.run.{done.status}")


def _step_delta(job_id: str, call: ToolCallDelta) -> dict[str, Any]:
    """A piece of a tool call, as OpenAI streams a run step's."""
    function: dict[str, Any] = {"arguments": call.arguments}
    entry: dict[str, Any] = {"index": call.index, "type": "function", "function": function}
    if call.id is not None:
        entry["id"], function["name"], function["output"] = call.id, call.name, None
    return {"id": f"step_{job_id.removeprefix('job_')}", "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [entry]}}}


async def _owned_run(thread_id: str, run_id: str) -> Run:
    run = await store.get(state().redis, Run, check_id(run_id, "run_id"), caller())
    if run.thread_id != check_id(thread_id, "thread_id"):
        raise NotFound(f"No run found with id '{run_id}' in thread '{thread_id}'")
    return run


async def _checked(run: Run) -> Run:
    """A run whose worker died is failed, not left in progress forever."""
    redis = state().redis
    if run.status in FINISHED:
        return run
    if run.job_id and await job_lost(redis, run.job_id, state().settings):
        error = {"code": "worker_lost", "message": "The worker running this run stopped"}
        return await store.update_run(redis, run.id, status="failed", failed_at=now(),
                                      last_error=error) or run
    return run


async def _assistant(assistant_id: str) -> Assistant:
    try:
        return await store.get(state().redis, Assistant, check_id(assistant_id, "assistant_id"),
                               caller())
    except NotFound as e:
        raise InvalidRequest(e.message, param="assistant_id") from e


async def _model(model_id: str) -> models.ModelRecord:
    try:
        return await models.get(state().redis, model_id)
    except NotFound as e:
        raise InvalidRequest(f"The run's model '{model_id}' does not exist", param="model") from e


async def _prompt(thread: Thread, instructions: str | None, record: models.ModelRecord,
                  max_tokens: int | None) -> list[dict[str, Any]]:
    """Instructions plus the thread's messages, dropping the oldest until they fit the context."""
    vocab = await tokenizer(record.id)

    def size(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False)) + MESSAGE_OVERHEAD

    ctx = record.ctx_len or state().settings.ctx_len
    budget = ctx - (max_tokens or min(DEFAULT_RESERVE, ctx // 4))
    system = [{"role": "system", "content": instructions}] if instructions else []
    budget -= sum(size(m["content"]) for m in system)
    kept: list[Message] = []
    for message in reversed(await store.history(state().redis, thread)):
        budget -= size(message.text)
        if budget < 0 and kept:
            break
        kept.append(message)
    if not kept:
        raise InvalidRequest("The thread has no messages to answer", param="thread_id")
    return system + [{"role": m.role, "content": m.text} for m in reversed(kept)]


def _sampling(assistant: Assistant, run: Run) -> Sampling:
    params = {k: v for k, v in assistant.parameters.items() if k in Sampling.model_fields}
    for name in ("temperature", "top_p"):
        if getattr(run, name) is not None:
            params[name] = getattr(run, name)
    if run.max_completion_tokens:
        params["max_tokens"] = run.max_completion_tokens
    try:
        return Sampling.model_validate(params)
    except ValueError as e:
        raise InvalidRequest(f"The assistant's parameters are invalid: {e}",
                             param="assistant_id") from e
