#!/usr/bin/env python3
"""Serve pip_cache_check.py's demo wheels from a local PEP 503 index until stdin closes.

Usage: wheel_index.py WORKDIR

Prints `index: URL` once serving, and `gets: {...}` (wheel downloads per file) when stdin
closes. Used by the container tests, where several pip processes share one index.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pip_cache_check as p  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    wheel_dir = Path(argv[1]).resolve() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels: dict[str, list[Path]] = {}
    for name, version, requires, source in p.PACKAGES:
        wheels.setdefault(name, []).append(p.build_wheel(wheel_dir, name, version, requires, source))
    state = p.IndexState(wheels)
    server = ThreadingHTTPServer(("127.0.0.1", 0), p.make_handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"index: http://127.0.0.1:{server.server_address[1]}/simple", flush=True)
    sys.stdin.read()
    with state.lock:
        print("gets: " + json.dumps(state.wheel_gets), flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
