#!/usr/bin/env python3
"""End-to-end check that pip's HTTP cache works when PIP_CACHE_DIR is on a given directory.

Usage: pip_cache_check.py CACHE_DIR WORKDIR [--evict-between SHELL_CMD] [--port PORT]
                          [--cached-only]

kcache's integration tests run this against a kcache mount; it must also pass on a
plain local directory. Everything happens offline:

1. three tiny pure-Python wheels are written by hand into WORKDIR/wheels
   (kcache-demo-a depends on kcache-demo-b; kcache-demo-c is standalone);
2. a PEP 503 "simple" index for them is served on 127.0.0.1 (random port) from a
   thread; the server counts every GET of a wheel file;
3. pip (the one installed next to sys.executable) installs kcache-demo-a and
   kcache-demo-c twice, into WORKDIR/t1 and then into a fresh WORKDIR/t2, with
   PIP_CACHE_DIR=CACHE_DIR;
4. we require: both runs succeed, run 1 fetched each wheel exactly once, run 2 fetched
   no wheel at all (pip served it from CACHE_DIR/http-v2), pip never said the cache
   was disabled, and CACHE_DIR/http-v2 holds metadata and `.body` files.

CACHE_DIR may already hold entries from earlier runs: pip keys its cache by URL and
the index port is random, so each run starts cold for its own URLs.

Note for filesystems: running as root, pip disables its cache unless CACHE_DIR (or its
nearest existing parent), opened with O_NOFOLLOW, reports st_uid 0; as another user it
needs os.access(W_OK). Cache writes are O_CREAT|O_EXCL temp files + fsync + rename.

With --evict-between, SHELL_CMD runs between the two installs (it empties the cache,
e.g. `kcache evict --to 0`), and run 2 must then download every wheel exactly once
again and succeed: a cache that lost entries costs a download, never a failure.

With --port, the index listens on that port instead of a random one, so a later run
elsewhere asks for the same URLs. With --cached-only (use with the same --port as the run
that filled the cache), the wheel file server is stopped: the index still answers its
pages (pip revalidates those on every run) but refuses every wheel download with 503;
one install must then succeed from CACHE_DIR alone ("Using cached" for every wheel).
This is how a cache pulled from another machine is checked.

Prints `pip cache check: ok` and exits 0 on success; otherwise explains the failure
on stderr and exits 1.
"""

from __future__ import annotations

import base64
import faulthandler
import hashlib
import html
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PIP_TIMEOUT_S = 40  # per pip run; the whole script must stay under 2 minutes
WATCHDOG_S = 115  # last resort: dump every thread's stack and exit if something hangs anyway

# name, version, requirements, module source
PACKAGES = [
    ("kcache-demo-a", "1.0", ["kcache-demo-b>=1.0"], "from kcache_demo_b import VALUE as B\nVALUE = 'a' + B\n"),
    ("kcache-demo-b", "1.0", [], "VALUE = 'b'\n"),
    ("kcache-demo-c", "1.0", [], "VALUE = 'c'\n"),
]
# Only a and c are requested: b must come in as a dependency, so the resolver path
# that reads a wheel's METADATA from the (cached) wheel is exercised as well.
REQUESTED = ["kcache-demo-a", "kcache-demo-c"]

# Lines pip prints when it decides it cannot use the cache directory. pip swallows most
# cache I/O errors silently (see pip/_internal/network/cache.py: suppressed_cache_errors),
# so the download counters below are the real test; these catch the loud cases.
FORBIDDEN_OUTPUT = [
    "is not owned or is not writable by the current user",
    "cache has been disabled",
    "Cache entry deserialization failed",
]


class CheckFailed(Exception):
    pass


def fail(msg: str) -> None:
    raise CheckFailed(msg)


# --------------------------------------------------------------------------- wheels


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build_wheel(out_dir: Path, name: str, version: str, requires: list[str], source: str) -> Path:
    """Write a minimal valid py3-none-any wheel (PEP 427) and return its path."""
    dist = name.replace("-", "_")
    dist_info = f"{dist}-{version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        "Summary: kcache test fixture",
    ] + [f"Requires-Dist: {r}" for r in requires]
    files = {
        f"{dist}/__init__.py": source.encode(),
        f"{dist_info}/METADATA": ("\n".join(metadata) + "\n").encode(),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: kcache-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ).encode(),
        f"{dist_info}/top_level.txt": f"{dist}\n".encode(),
    }
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{record_name},,\n"
    files[record_name] = record.encode()

    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in files.items():
            # Fixed timestamps keep the wheel bytes (and so their sha256) reproducible.
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path


# --------------------------------------------------------------------------- index server


class IndexState:
    def __init__(self, wheels: dict[str, list[Path]]):
        # normalized project name -> wheel paths
        self.projects = wheels
        self.files = {p.name: p.read_bytes() for paths in wheels.values() for p in paths}
        self.lock = threading.Lock()
        self.wheel_gets: dict[str, int] = {name: 0 for name in self.files}
        self.page_304s = 0  # index pages revalidated from a cached copy
        self.log: list[str] = []
        self.unexpected: list[str] = []
        self.files_stopped = False

    def project_page(self, project: str) -> bytes:
        links = []
        for p in self.projects[project]:
            sha = hashlib.sha256(self.files[p.name]).hexdigest()
            # Relative href, as real indexes commonly use; the #sha256 fragment makes pip
            # verify the (possibly cached) body it installs.
            links.append(f'<a href="../../files/{html.escape(p.name)}#sha256={sha}">{html.escape(p.name)}</a><br/>')
        body = f"<!DOCTYPE html><html><body><h1>Links for {project}</h1>{''.join(links)}</body></html>"
        return body.encode()

    def root_page(self) -> bytes:
        links = "".join(f'<a href="{p}/">{p}</a><br/>' for p in sorted(self.projects))
        return f"<!DOCTYPE html><html><body>{links}</body></html>".encode()


def make_handler(state: IndexState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real index

        def log_message(self, fmt, *args):  # keep pip's output readable; we keep our own log
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            with state.lock:
                state.log.append(f"{self.command} {self.path} -> {status}")
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and status not in (204, 304):
                self.wfile.write(body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path.startswith("/files/"):
                name = path[len("/files/"):]
                data = state.files.get(name)
                if data is None:
                    return self._not_found()
                if self.command == "GET":
                    with state.lock:
                        state.wheel_gets[name] += 1
                if state.files_stopped:
                    return self._send(503, b"file server stopped\n", {"Content-Type": "text/plain"})
                # Like PyPI: immutable files with a very long max-age, so pip's cachecontrol
                # layer stores them and later serves them without asking us again.
                return self._send(200, data, {
                    "Content-Type": "application/octet-stream",
                    "Cache-Control": "max-age=365000000, immutable, public",
                    "ETag": '"' + hashlib.sha256(data).hexdigest() + '"',
                    "Last-Modified": "Wed, 01 Jan 2020 00:00:00 GMT",
                })
            if path in ("/simple", "/simple/"):
                return self._page(state.root_page())
            if path.startswith("/simple/"):
                project = path[len("/simple/"):].strip("/")
                if project in state.projects:
                    return self._page(state.project_page(project))
            return self._not_found()

        def _page(self, body: bytes) -> None:
            # Index pages are stored (they carry an ETag) but must be revalidated on every
            # use: run 2 then sends If-None-Match, gets 304, and pip's cachecontrol rewrites
            # the existing cache entry -- an overwrite-by-rename in CACHE_DIR, not only creates.
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            headers = {
                "Content-Type": "text/html; charset=utf-8",
                "Cache-Control": "max-age=0, must-revalidate",
                "ETag": etag,
            }
            if self.headers.get("If-None-Match") == etag:
                with state.lock:
                    state.page_304s += 1
                return self._send(304, b"", headers)
            return self._send(200, body, headers)

        def _not_found(self) -> None:
            with state.lock:
                state.unexpected.append(f"{self.command} {self.path}")
            self._send(404, b"not found\n", {"Content-Type": "text/plain"})

    return Handler


# --------------------------------------------------------------------------- pip runs


def pip_env(cache_dir: Path) -> dict[str, str]:
    # Start from the caller's environment but drop anything that would point pip at
    # another index, config file or proxy (this machine sets e.g. PIP_FIND_LINKS).
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("PIP_") and "PROXY" not in k.upper()}
    env.update({
        "PIP_CACHE_DIR": str(cache_dir),
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_CONFIG_FILE": os.devnull,  # ignore /etc/pip.conf and user config
        "PIP_ROOT_USER_ACTION": "ignore",  # tests run as root; keep the output to the point
        "PIP_PROGRESS_BAR": "off",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    return env


def run_pip(index_url: str, target: Path, env: dict[str, str]) -> str:
    cmd = [
        sys.executable, "-m", "pip", "install", "-v",
        "--index-url", index_url,
        "--trusted-host", "127.0.0.1",  # plain http: pip caches only https or trusted origins
        "--target", str(target),
        "--no-compile",
        "--timeout", "20",
        "--retries", "0",
        *REQUESTED,
    ]
    try:
        proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=PIP_TIMEOUT_S, text=True)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        fail(f"pip timed out after {PIP_TIMEOUT_S}s installing into {target}\n--- pip output ---\n{out}")
    if proc.returncode != 0:
        fail(f"pip exited {proc.returncode} installing into {target}\n"
             f"command: {' '.join(cmd)}\n--- pip output ---\n{proc.stdout}")
    return proc.stdout


def check_output_clean(run: str, out: str) -> None:
    for needle in FORBIDDEN_OUTPUT:
        if needle.lower() in out.lower():
            fail(f"{run}: pip reported a cache problem ({needle!r})\n--- pip output ---\n{out}")


def check_installed(target: Path) -> None:
    for name, version, _, _ in PACKAGES:
        dist = name.replace("-", "_")
        if not (target / dist / "__init__.py").is_file():
            fail(f"{dist} was not installed into {target}")
        if not (target / f"{dist}-{version}.dist-info" / "RECORD").is_file():
            fail(f"{dist}-{version}.dist-info/RECORD missing in {target}")
    # Import from the target in a child to prove the installed files are usable.
    code = "import kcache_demo_a, kcache_demo_c; assert kcache_demo_a.VALUE == 'ab' and kcache_demo_c.VALUE == 'c'"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=15, text=True)
    if proc.returncode != 0:
        fail(f"installed packages in {target} do not import correctly:\n{proc.stdout}")


def count_cache_entries(cache_dir: Path) -> tuple[int, int, Path | None]:
    """Return (metadata files, .body files, directory) for pip's HTTP cache."""
    for sub in ("http-v2", "http"):
        root = cache_dir / sub
        if root.is_dir():
            meta = body = 0
            for dirpath, _, filenames in os.walk(root):
                for f in filenames:
                    if f.endswith(".tmp"):
                        continue  # leftovers of adjacent_tmp_file would be a bug, but not entries
                    if f.endswith(".body"):
                        body += 1
                    else:
                        meta += 1
            return meta, body, root
    return 0, 0, None


def leftover_tmp_files(cache_dir: Path) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(cache_dir):
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".tmp"))
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    evict_cmd = None
    port = 0
    cached_only = False
    argv = list(argv)
    if "--cached-only" in argv:
        argv.remove("--cached-only")
        cached_only = True
    for flag in ("--evict-between", "--port"):
        if flag in argv[3:]:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                print(__doc__, file=sys.stderr)
                return 2
            if flag == "--port":
                port = int(argv[i + 1])
            else:
                evict_cmd = argv[i + 1]
            del argv[i : i + 2]
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    cache_dir = Path(argv[1]).resolve()
    workdir = Path(argv[2]).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    for t in ("t1", "t2", "wheels"):
        shutil.rmtree(workdir / t, ignore_errors=True)
    wheel_dir = workdir / "wheels"
    wheel_dir.mkdir()

    wheels: dict[str, list[Path]] = {}
    for name, version, requires, source in PACKAGES:
        wheels.setdefault(name, []).append(build_wheel(wheel_dir, name, version, requires, source))

    state = IndexState(wheels)
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="pip-index", daemon=True)
    thread.start()
    index_url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    env = pip_env(cache_dir)

    try:
        if cached_only:
            state.files_stopped = True
            out = run_pip(index_url, workdir / "t2", env)
            check_output_clean("cached-only run", out)
            check_installed(workdir / "t2")
            for paths in wheels.values():
                for p in paths:
                    if f"Using cached {p.name}" not in out:
                        fail(f"the install lacks 'Using cached {p.name}'\n--- pip output ---\n{out}")
            with state.lock:
                tried = {k: v for k, v in state.wheel_gets.items() if v}
            if tried:
                fail(f"pip tried to download wheels although the cache has them: {tried}")
            print("pip: installed every wheel from the cache with the file server stopped")
            print("pip cache check: ok")
            return 0
        t0 = time.monotonic()
        out1 = run_pip(index_url, workdir / "t1", env)
        t1 = time.monotonic()
        with state.lock:
            gets1 = dict(state.wheel_gets)
            for k in state.wheel_gets:
                state.wheel_gets[k] = 0
        check_output_clean("run 1", out1)
        check_installed(workdir / "t1")
        if any(n != 1 for n in gets1.values()):
            fail(f"run 1 should download every wheel exactly once, server saw GETs: {gets1}\n"
                 f"--- pip output ---\n{out1}")

        meta, body, http_dir = count_cache_entries(cache_dir)
        if http_dir is None or meta == 0:
            fail(f"no HTTP cache entries under {cache_dir}/http-v2 (or http/) after run 1; "
                 f"cache dir contains: {sorted(os.listdir(cache_dir))}")
        if http_dir.name == "http-v2" and body < len(gets1):
            fail(f"{http_dir} holds {body} .body files, expected at least {len(gets1)} (one per wheel)")

        if evict_cmd:
            proc = subprocess.run(evict_cmd, shell=True, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                fail(f"{evict_cmd!r} failed: {proc.stdout}{proc.stderr}")
            print(f"between the runs: {proc.stdout.strip()}")
        out2 = run_pip(index_url, workdir / "t2", env)
        t2 = time.monotonic()
        with state.lock:
            gets2 = dict(state.wheel_gets)
            page_304s = state.page_304s
        check_output_clean("run 2", out2)
        check_installed(workdir / "t2")
        if evict_cmd:
            if any(n != 1 for n in gets2.values()):
                fail(f"after eviction run 2 should download every wheel exactly once, server saw {gets2}\n"
                     f"--- pip output ---\n{out2}")
            print(f"pip: run 2 after eviction downloaded {sum(gets2.values())} wheels again")
            print("pip cache check: ok")
            return 0
        if any(n != 0 for n in gets2.values()):
            fail(f"run 2 downloaded wheels again instead of using the HTTP cache in {cache_dir}: {gets2}\n"
                 f"(pip ignores cache write/read errors silently; check {http_dir})\n--- pip output ---\n{out2}")
        # Run 2 must have found the cached index pages too (it revalidates them by ETag).
        if page_304s < len(wheels):
            fail(f"run 2 revalidated only {page_304s} of {len(wheels)} index pages from the cache "
                 f"(expected If-None-Match -> 304 for each)\n--- pip output ---\n{out2}")
        # pip -v says "Using cached <file>" when the wheel body came from the HTTP cache.
        for paths in wheels.values():
            for p in paths:
                if f"Using cached {p.name}" not in out2:
                    fail(f"run 2 output lacks 'Using cached {p.name}'\n--- pip output ---\n{out2}")

        tmp_left = leftover_tmp_files(cache_dir)
        if tmp_left:
            fail(f"temporary files left in the cache after pip finished: {tmp_left[:5]}")
        if state.unexpected:
            fail(f"pip requested unknown URLs: {state.unexpected}")

        meta, body, http_dir = count_cache_entries(cache_dir)
        print(f"pip: run 1 {t1 - t0:.1f}s (wheel GETs {sum(gets1.values())}), "
              f"run 2 {t2 - t1:.1f}s (wheel GETs {sum(gets2.values())}); "
              f"{http_dir}: {meta} entries, {body} bodies")
        if os.environ.get("KCACHE_PY_VERBOSE"):
            print("server request log:\n  " + "\n  ".join(state.log), file=sys.stderr)
        print("pip cache check: ok")
        return 0
    except CheckFailed as e:
        print(f"pip cache check: FAILED: {e}", file=sys.stderr)
        with state.lock:
            print("server request log:\n  " + "\n  ".join(state.log), file=sys.stderr)
        return 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
