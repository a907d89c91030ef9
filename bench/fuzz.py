"""Fuzz: schemathesis over Ferry's whole `/openapi.json`, in server mode, with a real API key.

Starts its own Redis, a worker (the bundled chat and embedding models, a 128-token context so
generated completions stay short) and a web process with FERRY_AUTH on. Makes an admin user and a
read+write API key with the CLI, as an operator would, then runs schemathesis's own CLI against
every operation (its examples, coverage, fuzzing and stateful phases) with four checks: no 5xx,
a documented status, a documented content type, and a body that matches its schema.

    python bench/fuzz.py [--max-examples 25] [--max-time 1500] [--logs DIR] [-- schemathesis args]

Left out: `POST /v1/models` and its `/api/v1` twin (a download: it would fetch the URLs it is
given), and a download's `/progress` stream, which stays open while the model exists. Prints
schemathesis's summary (operations, cases, failures by check); the exit status is its own.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.stream import Processes  # noqa: E402
from ferry.lifeline import die_with_parent  # noqa: E402
from ferry.redis_server import EmbeddedRedis, free_port  # noqa: E402

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance," \
         "response_schema_conformance"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-examples", type=int, default=25, help="cases per operation and phase")
    p.add_argument("--max-time", type=int, default=1500, help="schemathesis's time budget, s")
    p.add_argument("--logs", type=Path, help="where the processes' logs go (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more schemathesis arguments (after --)")
    args = p.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="ferry-fuzz-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"logs in {logs}", flush=True)
    server = EmbeddedRedis(logs / "redis")
    env = dict(os.environ, REDIS_URL=server.start(), FERRY_DATA_DIR=str(logs / "data"),
               FERRY_AUTH="true", FERRY_JWT_SECRET=secrets.token_urlsafe(32),
               FERRY_CTX_LEN="128", FERRY_N_THREADS="1",
               FERRY_RATE_LIMIT_USER_PER_HOUR="0", FERRY_RATE_LIMIT_IP_PER_HOUR="0",
               FERRY_RATE_LIMIT_INFERENCE_PER_MINUTE="0", PYTHONUNBUFFERED="1")
    ferry = [sys.executable, "-m", "ferry"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with Processes(logs) as procs:
            procs.start("worker", [*ferry, "worker", "--cpu", "--model", "smollm2-135m-instruct",
                                   "--model", "all-minilm-l6-v2"], env)
            procs.start("web", [*ferry, "web", "--port", str(port)], env)
            procs.wait_healthy("web", url)
            subprocess.run([*ferry, "users", "create", "fuzzer", "--admin"], env=env, check=True,
                           stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
            key = subprocess.run([*ferry, "keys", "create", "--user", "fuzzer"], env=env,
                                 check=True, capture_output=True, text=True,
                                 preexec_fn=die_with_parent).stdout.split()[-1]
            cli = Path(sys.executable).with_name("schemathesis")
            run = subprocess.run([
                str(cli), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}",
                "--phases", "examples,coverage,fuzzing,stateful", "--checks", CHECKS,
                "--max-examples", str(args.max_examples), "--max-time", str(args.max_time),
                "--request-timeout", "120", "--continue-on-failure", "--seed", "1",
                "--exclude-name", "POST /v1/models", "--exclude-name", "POST /api/v1/models",
                "--exclude-path-regex", "/progress$",
                "--report", "junit", "--report-dir", str(logs / "report"), *args.extra,
            ], env=env, preexec_fn=die_with_parent)  # it ends with this script, however that ends
            raise SystemExit(run.returncode)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
