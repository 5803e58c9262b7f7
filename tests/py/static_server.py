#!/usr/bin/env python3
"""A static HTTP server over a directory that counts the bytes it sends per path.

Usage: static_server.py DIR [--rate BYTES_PER_SEC] [--no-ranges]

Prints `url: http://127.0.0.1:PORT` once serving; when stdin closes, prints
`sent: {path: bytes, ...}` and `ranges: {path: count, ...}` (requests answered with 206) and
exits. Bytes are counted as they go out, so a transfer the client abandons counts what was
really sent. `--rate` caps each response's speed, so a test can watch a download that takes
a while; single `Range: bytes=a-b` requests are answered with 206 unless `--no-ranges`.
Used by the remote-tier tests to check how much an upstream actually had to send.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

SENT: dict[str, int] = {}
RANGES: dict[str, int] = {}
LOCK = threading.Lock()
RATE = 0
USE_RANGES = True
CHUNK = 64 * 1024


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def send(self, source, count):
        start = time.monotonic()
        n = 0
        while n < count:
            buf = source.read(min(CHUNK, count - n))
            if not buf:
                break
            try:
                self.wfile.write(buf)
            except OSError:
                return
            n += len(buf)
            with LOCK:
                SENT[self.path] = SENT.get(self.path, 0) + len(buf)
            if RATE:
                ahead = n / RATE - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    def do_GET(self):
        self.serve(head=False)

    def do_HEAD(self):
        self.serve(head=True)

    def serve(self, head: bool):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        start, end, status = 0, size, 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if m and USE_RANGES:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            if start >= size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            with LOCK:
                RANGES[self.path] = RANGES.get(self.path, 0) + 1
        self.end_headers()
        if head:
            return
        with open(path, "rb") as f:
            f.seek(start)
            self.send(f, end - start)


def main(argv: list[str]) -> int:
    global RATE, USE_RANGES
    args = argv[1:]
    if "--rate" in args:
        i = args.index("--rate")
        RATE = int(args[i + 1])
        del args[i : i + 2]
    if "--no-ranges" in args:
        args.remove("--no-ranges")
        USE_RANGES = False
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=args[0]))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"url: http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()
    with LOCK:
        print("sent: " + json.dumps(SENT), flush=True)
        print("ranges: " + json.dumps(RANGES), flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
