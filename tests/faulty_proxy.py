"""A fault-injecting HTTP proxy in front of the local S3 server: answers some requests with 503, cuts
others off mid-way, can refuse one key for good, and can add a fixed latency to every request (a remote
object store's round trip, for benchmarks). Bounded: it only serves 127.0.0.1 and stops with
the test.

`process=True` serves from a child process: a caller that blocks its own process's threads cannot starve
it. deltalake holds the GIL during some S3 round trips (delta-io/delta-rs#4402), so an in-process proxy
in front of the snapshot's commits waits for the very call that waits for it.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        fail_every: int = 0,
        drop_every: int = 0,
        broken: str | None = None,
        delay_s: float = 0.0,
        process: bool = False,
        state_file: str | None = None,
    ):
        # process=True: the counters below are the child's, read back when the proxy stops
        self.process, self.state_file, self._child = process, state_file, None
        self._args = [upstream, str(fail_every), str(drop_every), broken or "", str(delay_s)]
        self.upstream = upstream.removeprefix("http://")
        self.delay_s = delay_s
        self.fail_every, self.drop_every, self.broken = fail_every, drop_every, broken
        self.count = 0
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.injected = {"503": 0, "drop": 0, "broken": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.count += 1
                    proxy.requests.append((self.command, self.path))
                    n = proxy.count
                proxy._save()
                if proxy.broken and proxy.broken in self.path and self.command == "GET":
                    proxy.injected["broken"] += 1
                    return self._reply(
                        500, b"<Error><Code>InternalError</Code><Message>broken</Message></Error>"
                    )
                if proxy.fail_every and n % proxy.fail_every == 0:
                    proxy.injected["503"] += 1
                    return self._reply(
                        503, b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    )
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if proxy.drop_every and n % proxy.drop_every == 0 and len(data) > 64:
                    proxy.injected["drop"] += 1  # promise the whole body, send half, hang up
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                head = self.command == "HEAD"  # HEAD keeps the object's Content-Length and sends no body
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (
                        head or k.lower() != "content-length"
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _reply(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _save(self) -> None:
        """Child mode: the counters, for the parent (written whole, then renamed, under the lock)."""
        if self.state_file:
            with self.lock:
                state = {"count": self.count, "requests": self.requests, "injected": self.injected}
                with open(self.state_file + ".tmp", "w") as f:
                    json.dump(state, f)
                os.replace(self.state_file + ".tmp", self.state_file)

    def _load(self) -> None:
        try:
            with open(self.state_file) as f:
                state = json.load(f)
        except FileNotFoundError:
            return
        self.count, self.injected = state["count"], state["injected"]
        self.requests = [tuple(r) for r in state["requests"]]

    def __enter__(self) -> FaultyProxy:
        if not self.process:
            self.thread.start()
            return self
        self.server.server_close()  # the child binds its own port
        self.state_file = tempfile.mktemp(prefix="faulty-proxy-", suffix=".json")
        self._child = subprocess.Popen(
            [sys.executable, __file__, self.state_file, *self._args], stdout=subprocess.PIPE, text=True
        )
        self.url = self._child.stdout.readline().strip()
        return self

    def __exit__(self, *exc) -> None:
        if self._child is not None:
            self._load()
            self._child.terminate()
            self._child.wait(timeout=10)
            self._child = None
            return
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":  # child mode (process=True): serve until terminated
    state, upstream, fail_every, drop_every, broken, delay_s = sys.argv[1:7]
    child = FaultyProxy(
        upstream, int(fail_every), int(drop_every), broken or None, float(delay_s), state_file=state
    )
    print(child.url, flush=True)
    child.server.serve_forever()
