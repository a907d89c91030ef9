"""A real HTTP file server for download tests: Range requests, a published sha256, and faults.

`drop_after` closes the connection after that many bytes of a full (non-Range) response, to prove
resume; `delay_s` slows each 64 KiB so a download can be cancelled while it runs.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.drop_after: int | None = None
        self.delay_s = 0.0
        self.ranges_seen: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, path: Path, publish_sha256: bool = False) -> str:
        self.files[name] = path
        if publish_sha256:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            sums = path.with_name(path.name + ".sha256")
            sums.write_text(f"{digest}  {name}\n")
            self.files[name + ".sha256"] = sums
        return f"{self.url}/{name}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = server.files.get(self.path.lstrip("/"))
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    server.ranges_seen.append(rng)
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                limit = server.drop_after if not rng and server.drop_after else len(body)
                step = 64 * 1024
                for i in range(0, min(limit, len(body)), step):
                    if server.delay_s:
                        threading.Event().wait(server.delay_s)
                    try:
                        self.wfile.write(body[i:min(i + step, limit)])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if limit < len(body):
                    self.close_connection = True  # cut off: the client sees a short body

        return Handler

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
