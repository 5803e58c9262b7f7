#!/usr/bin/env python3
"""A static HTTP server over a directory that counts the bytes it sends per path.

Usage: static_server.py DIR

Prints `url: http://127.0.0.1:PORT` once serving; when stdin closes, prints
`sent: {path: bytes, ...}` and exits. Used by the remote-tier tests to check how much an
upstream actually had to send.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

SENT: dict[str, int] = {}
LOCK = threading.Lock()


class Handler(SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def copyfile(self, source, outputfile):
        n = 0
        while True:
            buf = source.read(64 * 1024)
            if not buf:
                break
            outputfile.write(buf)
            n += len(buf)
        with LOCK:
            SENT[self.path] = SENT.get(self.path, 0) + n


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=argv[1]))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"url: http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()
    with LOCK:
        print("sent: " + json.dumps(SENT), flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    shutil.disk_usage(".")  # keep the import used on every Python
    sys.exit(main(sys.argv))
