"""`ferry batch submit|list|get|cancel`: the Batch API from the shell, over HTTP.

Talks to a running Ferry (``--url``, default this machine's `FERRY_HOST`/`FERRY_PORT`), with
``FERRY_API_KEY`` as the bearer in server mode.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from shared.settings import Settings

DONE = {"completed", "failed", "expired", "cancelled"}


def main(settings: Settings, verb: str, args: dict[str, Any]) -> int:
    url = args.get("url") or f"http://{settings.host}:{settings.port}"
    key = os.environ.get("FERRY_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=600) as http:
        try:
            if verb == "submit":
                return _submit(http, Path(args["file"]), args["endpoint"], args["wait"])
            if verb == "list":
                for b in _ok(http.get("/batches", params={"limit": 100}))["data"]:
                    counts = b["request_counts"]
                    print(f"{b['id']}  {b['status']:<11} {counts['completed']}+{counts['failed']}"
                          f"/{counts['total']}  {b['endpoint']}")
                return 0
            if verb == "get":
                print(json.dumps(_ok(http.get(f"/batches/{args['id']}")), indent=2))
                return 0
            print(json.dumps(_ok(http.post(f"/batches/{args['id']}/cancel")), indent=2))
            return 0
        except (httpx.HTTPError, RuntimeError) as e:
            print(f"ferry batch {verb}: {e}", file=sys.stderr)
            return 1


def _submit(http: httpx.Client, path: Path, endpoint: str, wait: bool) -> int:
    with path.open("rb") as f:
        upload = _ok(http.post("/files", data={"purpose": "batch"}, files={"file": (path.name, f)}))
    batch = _ok(http.post("/batches", json={"input_file_id": upload["id"], "endpoint": endpoint,
                                            "completion_window": "24h"}))
    print(batch["id"])
    if not wait:
        return 0
    while batch["status"] not in DONE:
        time.sleep(1)
        batch = _ok(http.get(f"/batches/{batch['id']}"))
        counts = batch["request_counts"]
        done, total = counts["completed"] + counts["failed"], counts["total"] or 1
        bar = "#" * (30 * done // total)
        print(f"\r[{bar:<30}] {done}/{counts['total']} {batch['status']:<11}", end="", flush=True)
    print()
    for errors in (batch.get("errors") or {}).get("data", []):
        print(f"line {errors['line']}: {errors['code']}: {errors['message']}", file=sys.stderr)
    for kind in ("output_file_id", "error_file_id"):
        if batch.get(kind):
            print(f"{kind.removesuffix('_file_id')}: {http.base_url}/files/{batch[kind]}/content")
    return 0 if batch["status"] == "completed" else 1


def _ok(r: httpx.Response) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise RuntimeError(f"{r.status_code}: {message}")
    return dict(r.json())
