"""Assistants, threads, messages, runs and conversations, stored in a real Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from shared import keys
from tests.helpers import SMOLLM, error_of, sse_events


def make_thread(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/threads", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def say(http: httpx.Client, thread_id: str, text: str, role: str = "user") -> dict[str, Any]:
    r = http.post(f"/v1/threads/{thread_id}/messages", json={"role": role, "content": text})
    assert r.status_code == 200, r.text
    return r.json()


def wait_run(http: httpx.Client, thread_id: str, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        run = http.get(f"/v1/threads/{thread_id}/runs/{run_id}").json()
        if run["status"] in ("completed", "cancelled", "failed"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def test_assistant_crud_and_default(http: httpx.Client) -> None:
    assert http.get("/v1/assistants/jan").json()["name"] == "Jan"
    created = http.post("/v1/assistants", json={
        "name": "Poet", "instructions": "Answer in verse.", "model": SMOLLM,
        "metadata": {"team": "a"}, "parameters": {"temperature": 0.2},
    }).json()
    aid = created["id"]
    assert created["object"] == "assistant" and created["instructions"] == "Answer in verse."
    assert "owner" not in created
    assert http.get(f"/api/v1/assistants/{aid}").json() == created
    assert aid in [a["id"] for a in http.get("/v1/assistants", params={"limit": 100}).json()["data"]]
    changed = http.post(f"/v1/assistants/{aid}", json={"name": "Bard"}).json()
    assert changed["name"] == "Bard" and changed["instructions"] == "Answer in verse."
    deleted = http.delete(f"/v1/assistants/{aid}").json()
    assert deleted == {"id": aid, "object": "assistant.deleted", "deleted": True}
    error_of(http.get(f"/v1/assistants/{aid}"), 404)


def test_thread_crud_deletes_its_messages(http: httpx.Client, rds: Any) -> None:
    thread = make_thread(http, title="t", metadata={"k": "v"},
                         messages=[{"role": "user", "content": "first"}])
    tid = thread["id"]
    assert thread["object"] == "thread" and thread["metadata"] == {"k": "v"}
    assert http.get(f"/v1/threads/{tid}").json()["title"] == "t"
    assert http.patch(f"/v1/threads/{tid}", json={"title": "renamed"}).json()["title"] == "renamed"
    assert http.post(f"/v1/threads/{tid}", json={"metadata": {"a": "b"}}).json()["metadata"] == {"a": "b"}
    # a null title or assistants list is refused, not stored (every later read of it was a 500)
    for field in ("title", "assistants"):
        assert http.patch(f"/v1/threads/{tid}", json={field: None}).status_code == 400
    assert http.get(f"/v1/threads/{tid}").json()["title"] == "renamed"
    msg = say(http, tid, "second")
    assert msg["object"] == "thread.message" and msg["thread_id"] == tid
    assert msg["content"] == [{"type": "text", "text": {"value": "second", "annotations": []}}]
    got = http.get(f"/v1/threads/{tid}/messages/{msg['id']}").json()
    assert got == msg
    modified = http.post(f"/v1/threads/{tid}/messages/{msg['id']}", json={"metadata": {"x": "1"}})
    assert modified.json()["metadata"] == {"x": "1"}
    listed = http.get(f"/v1/threads/{tid}/messages", params={"order": "asc"}).json()
    assert [m["content"][0]["text"]["value"] for m in listed["data"]] == ["first", "second"]

    assert http.delete(f"/v1/threads/{tid}").json() == {
        "id": tid, "object": "thread.deleted", "deleted": True}
    error_of(http.get(f"/v1/threads/{tid}"), 404)
    error_of(http.get(f"/v1/threads/{tid}/messages"), 404)
    assert not rds.exists(keys.thread_messages(tid), keys.thread_order(tid))


def test_message_pagination_edges(http: httpx.Client) -> None:
    tid = make_thread(http)["id"]
    ids = [say(http, tid, f"m{i}")["id"] for i in range(7)]
    page = http.get(f"/v1/threads/{tid}/messages", params={"limit": 3, "order": "asc"}).json()
    assert [m["id"] for m in page["data"]] == ids[:3]
    assert page["first_id"] == ids[0] and page["last_id"] == ids[2] and page["has_more"]
    page = http.get(f"/v1/threads/{tid}/messages",
                    params={"limit": 3, "order": "asc", "after": ids[2]}).json()
    assert [m["id"] for m in page["data"]] == ids[3:6] and page["has_more"]
    page = http.get(f"/v1/threads/{tid}/messages",
                    params={"limit": 3, "order": "asc", "after": ids[5]}).json()
    assert [m["id"] for m in page["data"]] == ids[6:] and not page["has_more"]
    newest = http.get(f"/v1/threads/{tid}/messages", params={"limit": 2}).json()  # desc default
    assert [m["id"] for m in newest["data"]] == [ids[6], ids[5]]
    older = http.get(f"/v1/threads/{tid}/messages", params={"limit": 100, "after": ids[5]}).json()
    assert [m["id"] for m in older["data"]] == ids[4::-1] and not older["has_more"]
    window = http.get(f"/v1/threads/{tid}/messages",
                      params={"order": "asc", "after": ids[1], "before": ids[4]}).json()
    assert [m["id"] for m in window["data"]] == ids[2:4]
    empty = http.get(f"/v1/threads/{tid}/messages", params={"before": ids[6], "after": ids[5]})
    assert empty.json()["data"] == [] and empty.json()["first_id"] is None


@pytest.mark.parametrize(
    ("path", "body", "params", "param"),
    [
        ("/v1/threads/{tid}/messages", {"role": "wizard", "content": "x"}, {}, "role"),
        ("/v1/threads/{tid}/messages", {"role": "user", "content": "   "}, {}, "content"),
        ("/v1/threads/{tid}/messages", {"role": "user", "content": "x" * 5000}, {}, "content"),
        ("/v1/threads/{tid}/messages", {"role": "user", "content": "x",
                                        "metadata": {f"k{i}": "v" for i in range(17)}}, {}, "metadata"),
        ("/v1/threads/{tid}/messages", {"role": "user", "content": "x",
                                        "metadata": {"k" * 65: "v"}}, {}, "metadata"),
        ("/v1/threads/{tid}/messages", {"role": "user", "content": "x",
                                        "metadata": {"k": "v" * 513}}, {}, "metadata"),
        ("/v1/threads/{tid}/messages", None, {"limit": 0}, "limit"),
        ("/v1/threads/{tid}/messages", None, {"limit": 101}, "limit"),
        ("/v1/threads/{tid}/messages", None, {"order": "sideways"}, "order"),
        ("/v1/threads/{tid}/messages", None, {"after": "msg_nope"}, "after"),
        ("/v1/threads/bad id!/messages", None, {}, "thread_id"),
        ("/v1/threads/{tid}/runs", {"model": "no-such-model"}, {}, "model"),
        ("/v1/threads/{tid}/runs", {"assistant_id": "asst_nope"}, {}, "assistant_id"),
    ],
)
def test_bad_input_names_the_parameter(
    http: httpx.Client, path: str, body: Any, params: dict[str, Any], param: str
) -> None:
    tid = make_thread(http, messages=[{"role": "user", "content": "hi"}])["id"]
    url = path.format(tid=tid)
    r = http.post(url, json=body) if body is not None else http.get(url, params=params)
    assert error_of(r, 400)["param"] == param


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    tid = make_thread(http)["id"]
    for url in ("/v1/threads/thread_nope", "/v1/threads/thread_nope/messages",
                f"/v1/threads/{tid}/messages/msg_nope", f"/v1/threads/{tid}/runs/run_nope",
                "/v1/assistants/asst_nope", "/api/v1/conversations/conv_nope"):
        error_of(http.get(url), 404)


def test_concurrent_appends_keep_every_message_in_one_order(http: httpx.Client,
                                                              base_url: str) -> None:
    tid = make_thread(http)["id"]

    def post(i: int) -> str:
        with httpx.Client(base_url=base_url, timeout=30) as c:
            return say(c, tid, f"n{i}")["id"]

    with ThreadPoolExecutor(max_workers=10) as pool:
        posted = set(pool.map(post, range(50)))
    listed = http.get(f"/v1/threads/{tid}/messages", params={"limit": 100, "order": "asc"}).json()
    assert {m["id"] for m in listed["data"]} == posted and len(listed["data"]) == 50
    again = http.get(f"/v1/threads/{tid}/messages", params={"limit": 100, "order": "asc"}).json()
    assert [m["id"] for m in again["data"]] == [m["id"] for m in listed["data"]]
    desc = http.get(f"/v1/threads/{tid}/messages", params={"limit": 100}).json()
    assert [m["id"] for m in desc["data"]] == [m["id"] for m in listed["data"]][::-1]


def test_run_stores_the_assistant_reply(http: httpx.Client) -> None:
    assistant = http.post("/v1/assistants", json={
        "instructions": "Reply briefly.", "model": SMOLLM, "parameters": {"temperature": 0}}).json()
    tid = make_thread(http, assistants=[{"assistant_id": assistant["id"]}])["id"]
    say(http, tid, "What is the capital of France?")
    run = http.post(f"/v1/threads/{tid}/runs", json={"max_completion_tokens": 8}).json()
    assert run["object"] == "thread.run" and run["assistant_id"] == assistant["id"]
    assert run["status"] in ("queued", "in_progress", "completed")
    done = wait_run(http, tid, run["id"])
    assert done["status"] == "completed" and 0 < done["usage"]["completion_tokens"] <= 8
    messages = http.get(f"/v1/threads/{tid}/messages", params={"order": "asc"}).json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    reply = messages[1]
    assert reply["run_id"] == run["id"] and reply["assistant_id"] == assistant["id"]
    assert reply["content"][0]["text"]["value"]


def test_streamed_run(http: httpx.Client, base_url: str) -> None:
    tid = make_thread(http, messages=[{"role": "user", "content": "Say hello."}])["id"]
    with httpx.stream("POST", f"{base_url}/v1/threads/{tid}/runs",
                      json={"stream": True, "max_completion_tokens": 6}, timeout=60) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names[:2] == ["thread.run.created", "thread.run.in_progress"]
    assert names[-3:] == ["thread.message.completed", "thread.run.completed", "done"]
    datas = [d for _, d in sse_events(iter(lines))]
    deltas = [orjson.loads(d) for d in datas if '"thread.message.delta"' in d]
    text = "".join(d["delta"]["content"][0]["text"]["value"] for d in deltas)
    stored = http.get(f"/v1/threads/{tid}/messages", params={"limit": 1}).json()["data"][0]
    assert stored["role"] == "assistant" and stored["content"][0]["text"]["value"] == text
    assert stored["id"] == deltas[0]["id"]


def test_cancel_a_running_run(http: httpx.Client) -> None:
    tid = make_thread(http, messages=[{"role": "user", "content": "Tell a very long story."}])["id"]
    http.post("/v1/assistants/jan", json={"parameters": {"ignore_eos": True}})
    try:
        run = http.post(f"/v1/threads/{tid}/runs", json={"max_completion_tokens": 400}).json()
        deadline = time.monotonic() + 30
        while http.get(f"/v1/threads/{tid}/runs/{run['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelling = http.post(f"/v1/threads/{tid}/runs/{run['id']}/cancel").json()
        assert cancelling["status"] in ("cancelling", "cancelled")
        done = wait_run(http, tid, run["id"])
        assert done["status"] == "cancelled" and done["cancelled_at"]
        roles = [m["role"] for m in http.get(f"/v1/threads/{tid}/messages").json()["data"]]
        assert roles == ["user"]  # a cancelled run stores no reply
        listed = http.get(f"/v1/threads/{tid}/runs").json()["data"]
        assert [r["id"] for r in listed] == [run["id"]]
    finally:
        http.post("/v1/assistants/jan", json={"parameters": {}})


def test_conversations_are_threads_and_record_chat_turns(http: httpx.Client) -> None:
    conv = http.post("/api/v1/conversations", json={"title": "chat", "model": SMOLLM}).json()
    cid = conv["id"]
    assert conv["object"] == "conversation" and conv["title"] == "chat"
    assert cid in [c["id"] for c in http.get("/api/v1/conversations").json()["data"]]
    assert http.get(f"/v1/threads/{cid}").json()["object"] == "thread"  # one object, two APIs
    r = http.post("/api/v1/chat/completions", json={
        "model": SMOLLM, "conversation": cid, "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hello there"}]})
    assert r.status_code == 200
    answer = r.json()["choices"][0]["message"]["content"]
    history = http.get(f"/api/v1/conversations/{cid}").json()["messages"]
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "Hello there"), ("assistant", answer)]
    error_of(http.post("/v1/chat/completions", json={
        "conversation": "conv_nope", "messages": [{"role": "user", "content": "x"}]}), 404)


def test_long_thread_is_trimmed_from_the_oldest_to_fit(http: httpx.Client) -> None:
    tid = make_thread(http)["id"]
    filler = "The lighthouse keeper watched the grey sea roll in again. " * 12  # ~150 tokens
    for i in range(30):  # ~4,500 tokens: more than the test workers' 2,048-token context
        say(http, tid, f"{i}: {filler}", role="user" if i % 2 == 0 else "assistant")
    say(http, tid, "Say OK.")
    run = http.post(f"/v1/threads/{tid}/runs", json={"max_completion_tokens": 4}).json()
    done = wait_run(http, tid, run["id"])
    assert done["status"] == "completed", done
    assert 1000 < done["usage"]["prompt_tokens"] <= 2048 - 4
