#!/usr/bin/env python3
"""End-to-end check of the Hugging Face Hub cache layout on a given directory.

Usage: hf_check.py CACHE_DIR [--no-mmap-write]
       hf_check.py CACHE_DIR --offline-only
       hf_check.py CACHE_DIR --evicted

The first form needs a CACHE_DIR without the test repos. --offline-only re-checks a
CACHE_DIR filled by an earlier run (e.g. after kcache was unmounted and mounted again):
no server is started, only the layout, mmap and HF_HUB_OFFLINE=1 checks run.
--evicted checks a CACHE_DIR whose files were evicted: offline downloads must fail with
huggingface_hub's normal LocalEntryNotFoundError, and every blob left must be whole.

kcache's integration tests run this against a kcache mount; it must also pass on a
plain local directory. No internet is used: a fake Hub is served on 127.0.0.1 and
huggingface_hub (the pinned version installed next to sys.executable) talks to it
through HF_ENDPOINT, with HF_HUB_CACHE=CACHE_DIR.

The fake Hub answers what `snapshot_download`/`hf_hub_download` need:
  GET  /api/models/{repo}/revision/{rev}          repo info (gives the commit sha)
  GET  /api/models/{repo}/tree/{rev}?recursive=.. file listing (cached on disk as trees/<sha>.json)
  HEAD /{repo}/resolve/{rev}/{path}               X-Repo-Commit + ETag (+ X-Linked-* for LFS)
  GET  /{repo}/resolve/{rev}/{path}               small git files are served directly
LFS files (model.safetensors, shared.bin) are redirected, like on the real Hub, to a
second "CDN" server on another port; huggingface_hub then takes the blob's name from
X-Linked-Etag (the sha256) and downloads the body from the CDN.

Repos: org/model-a (config.json, model.safetensors, shared.bin) and org/model-b
(shared.bin, byte-identical to model-a's, plus docs/notes.txt in a subfolder).

Steps:
1. online: snapshot_download(org/model-a), hf_hub_download(org/model-b, shared.bin),
   snapshot_download(org/model-b), then both snapshots again (must fetch no body);
2. checks of the cache layout: blobs named by etag with the served bytes, snapshot
   entries are relative symlinks into ../../blobs/, refs/main, .locks/, trees/;
3. model.safetensors is read with safetensors (safe_open, numpy) and numpy.memmap
   (mode 'r', 'c' and, unless --no-mmap-write, 'r+' on a scratch copy in CACHE_DIR);
4. the servers are stopped and a child process with HF_HUB_OFFLINE=1 (set before
   huggingface_hub is imported, which reads it at import time) repeats the calls: it
   must return the same paths and contents from the cache alone.

Prints `shared-bytes: N` (size of shared.bin, stored once per repo: two identical
blobs a deduplicating filesystem can share), `shared-blob: PATH` for each copy, and
`hf check: ok` on success; otherwise explains the failure on stderr and exits 1.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

CHILD_TIMEOUT_S = 60
WATCHDOG_S = 115  # last resort: dump every thread's stack and exit if something hangs anyway
SCRATCH_NAME = ".kcache-hf-check-scratch"


class CheckFailed(Exception):
    pass


def fail(msg: str) -> None:
    raise CheckFailed(msg)


# --------------------------------------------------------------------------- fixture data


def tensors():
    """The tensors stored in model.safetensors (also used to check what we read back)."""
    import numpy as np

    return {
        "weight": (np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7.0).astype(np.float32),
        "bias": np.arange(-16, 16, dtype=np.int64),
        "scale": np.array([0.5, 1.5, 2.5], dtype=np.float64),
    }


def make_repos() -> dict[str, dict[str, bytes]]:
    from safetensors.numpy import save

    import random

    # ~1 MiB of incompressible, deterministic bytes, identical in both repos.
    shared = random.Random(1234).randbytes(1024 * 1024 + 123)
    config = json.dumps({"model_type": "kcache-test", "hidden_size": 48, "layers": 1}, indent=2).encode()
    return {
        "org/model-a": {
            "config.json": config + b"\n",
            "model.safetensors": save(tensors(), metadata={"format": "np"}),
            "shared.bin": shared,
        },
        "org/model-b": {
            "shared.bin": shared,
            "docs/notes.txt": b"model-b notes: shares shared.bin with model-a\n",
        },
    }


# Files the fake Hub serves through LFS (redirect to the CDN, etag = sha256 of content).
LFS_SUFFIXES = (".safetensors", ".bin")


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(path: str, data: bytes) -> str:
    """What huggingface_hub will name the blob: sha256 for LFS files, git blob sha1 otherwise."""
    return hashlib.sha256(data).hexdigest() if is_lfs(path) else git_blob_sha1(data)


def commit_of(repo: str) -> str:
    return hashlib.sha1(f"kcache-test-commit:{repo}".encode()).hexdigest()


# --------------------------------------------------------------------------- fake hub


class HubState:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: commit_of(repo) for repo in repos}
        self.blobs = {hashlib.sha256(d).hexdigest(): d for files in repos.values() for d in files.values()}
        self.lock = threading.Lock()
        self.body_gets: dict[str, int] = {}  # "repo:path" -> number of GETs that returned the bytes
        self.log: list[str] = []
        self.unexpected: list[str] = []
        self.cdn_base = ""  # set once the CDN server is listening

    def count(self, key: str) -> None:
        with self.lock:
            self.body_gets[key] = self.body_gets.get(key, 0) + 1

    def snapshot_counts(self) -> dict[str, int]:
        with self.lock:
            return dict(self.body_gets)


def make_handler(state: HubState, role: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_length: int | None = None) -> None:
            with state.lock:
                state.log.append(f"[{role}] {self.command} {self.path} -> {status}")
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _error(self, status: int, code: str, extra: dict[str, str] | None = None) -> None:
            with state.lock:
                state.unexpected.append(f"[{role}] {self.command} {self.path} -> {status} {code}")
            headers = {"Content-Type": "application/json", "X-Error-Code": code}
            headers.update(extra or {})
            self._send(status, json.dumps({"error": code}).encode(), headers)

        def do_HEAD(self):
            self._dispatch()

        def do_GET(self):
            self._dispatch()

        def _dispatch(self):
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            try:
                if role == "cdn":
                    return self._cdn(parts)
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    return self._api(parts[2] + "/" + parts[3], parts[4], parts[5], parts[6:], parse_qs(url.query))
                if len(parts) >= 5 and parts[2] == "resolve":
                    return self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]))
            except (BrokenPipeError, ConnectionResetError):
                return
            return self._error(404, "RepoNotFound")

        def _rev_ok(self, repo: str, rev: str) -> bool:
            return rev in ("main", state.commits[repo])

        def _api(self, repo: str, kind: str, rev: str, rest: list[str], query) -> None:
            if repo not in state.repos:
                return self._error(404, "RepoNotFound")
            if not self._rev_ok(repo, rev):
                return self._error(404, "RevisionNotFound")
            files = state.repos[repo]
            sha = state.commits[repo]
            if kind == "revision" and not rest:
                return self._json({
                    "id": repo, "modelId": repo, "sha": sha, "private": False, "gated": False,
                    "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                })
            if kind == "tree" and not rest:
                # Recursive listing: directories first, like the Hub, then files.
                entries = []
                dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
                for d in dirs:
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                    "size": 0, "path": d})
                for p in sorted(files):
                    data = files[p]
                    e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
                    if is_lfs(p):
                        e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    entries.append(e)
                return self._json(entries)
            return self._error(404, "EntryNotFound")

        def _resolve(self, repo: str, rev: str, path: str) -> None:
            if repo not in state.repos:
                return self._error(404, "RepoNotFound")
            if not self._rev_ok(repo, rev):
                return self._error(404, "RevisionNotFound")
            commit = state.commits[repo]
            data = state.repos[repo].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
            if is_lfs(path):
                sha256 = hashlib.sha256(data).hexdigest()
                # Like the Hub: 302 to a CDN on another origin; the file's identity travels in
                # X-Linked-Etag / X-Linked-Size because huggingface_hub does not follow the
                # redirect for HEAD. The plain ETag is the pointer's and must NOT name the blob.
                return self._send(302, b"", {
                    "Location": f"{state.cdn_base}/lfs/{sha256}?" + urlencode({"repo": repo, "path": path}),
                    "X-Repo-Commit": commit,
                    "ETag": f'"{git_blob_sha1(b"pointer:" + sha256.encode())}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(data)),
                })
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": commit,
                "ETag": f'"{git_blob_sha1(data)}"',
            }
            if self.command == "GET":
                state.count(f"{repo}:{path}")
                return self._send(200, data, headers)
            return self._send(200, b"", headers, content_length=len(data))

        def _cdn(self, parts: list[str]) -> None:
            if len(parts) != 2 or parts[0] != "lfs" or parts[1] not in state.blobs:
                return self._error(404, "EntryNotFound")
            data = state.blobs[parts[1]]
            q = parse_qs(urlsplit(self.path).query)
            headers = {"Content-Type": "application/octet-stream", "ETag": f'"{parts[1]}"'}
            if self.command == "GET":
                state.count(f"{q.get('repo', ['?'])[0]}:{q.get('path', ['?'])[0]}")
                return self._send(200, data, headers)
            return self._send(200, b"", headers, content_length=len(data))

    return Handler


class Servers:
    def __init__(self, state: HubState):
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state, "hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state, "cdn"))
        self.threads = []
        for srv, name in ((self.hub, "fake-hub"), (self.cdn, "fake-cdn")):
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        state.cdn_base = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for srv in (self.hub, self.cdn):
            srv.shutdown()
            srv.server_close()
        for t in self.threads:
            t.join(timeout=5)


# --------------------------------------------------------------------------- environment


def hf_env(cache_dir: Path, hf_home: Path, endpoint: str, offline: bool) -> dict[str, str]:
    # Drop inherited HF settings (a token, offline flags, symlink switches...) and proxies
    # so the run depends only on what we set here.
    env = {k: v for k, v in os.environ.items()
           if not (k.upper().startswith(("HF_", "HUGGINGFACE_")) or k.upper() == "TRANSFORMERS_OFFLINE"
                   or "PROXY" in k.upper())}
    env.update({
        "HF_HUB_CACHE": str(cache_dir),
        "HF_HOME": str(hf_home),  # token / xet state live outside the cache under test
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_ETAG_TIMEOUT": "10",
        "HF_HUB_DOWNLOAD_TIMEOUT": "20",
        "DO_NOT_TRACK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


# --------------------------------------------------------------------------- hf calls (shared by both phases)


def run_downloads() -> dict:
    """The calls under test; returns the paths they returned and sha256 of what they point to."""
    from huggingface_hub import hf_hub_download, snapshot_download

    out: dict = {}
    out["snap_a"] = snapshot_download("org/model-a")
    out["file_b"] = hf_hub_download("org/model-b", "shared.bin")
    out["snap_b"] = snapshot_download("org/model-b")
    digests = {}
    for key in ("snap_a", "snap_b"):
        root = Path(out[key])
        for p in sorted(root.rglob("*")):
            if p.is_file():
                digests[f"{key}/{p.relative_to(root).as_posix()}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    digests["file_b"] = hashlib.sha256(Path(out["file_b"]).read_bytes()).hexdigest()
    out["digests"] = digests
    return out


def offline_child(cache_dir: str) -> int:
    """Entry point of the offline phase (a separate process: HF_HUB_OFFLINE is read at import)."""
    try:
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            print("offline child: HF_HUB_OFFLINE is not in effect", file=sys.stderr)
            return 1
        if Path(constants.HF_HUB_CACHE).resolve() != Path(cache_dir).resolve():
            print(f"offline child: HF_HUB_CACHE is {constants.HF_HUB_CACHE}, expected {cache_dir}", file=sys.stderr)
            return 1
        result = run_downloads()
        # Read the weights again through the snapshot symlink, with the server gone.
        check_safetensors(Path(result["snap_a"]) / "model.safetensors")
    except Exception as e:  # report anything, the parent prints it
        import traceback

        traceback.print_exc()
        print(f"offline child: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("RESULT " + json.dumps(result))
    return 0


# --------------------------------------------------------------------------- checks


def check_safetensors(path: Path) -> None:
    import numpy as np
    from safetensors import safe_open

    expected = tensors()
    # safe_open mmaps the file (through the snapshot symlink).
    with safe_open(str(path), framework="numpy") as f:
        if sorted(f.keys()) != sorted(expected):
            fail(f"{path}: tensors {sorted(f.keys())}, expected {sorted(expected)}")
        if f.metadata() != {"format": "np"}:
            fail(f"{path}: unexpected safetensors metadata {f.metadata()}")
        for name, want in expected.items():
            got = f.get_tensor(name)
            if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
                fail(f"{path}: tensor {name} differs (dtype {got.dtype}, shape {got.shape})")


def safetensors_layout(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """Parse the safetensors header: name -> (dtype, shape, absolute begin, end)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], v["shape"], base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items()}


def check_memmap(blob: Path, scratch_dir: Path | None) -> None:
    import numpy as np

    dtypes = {"F32": np.float32, "I64": np.int64, "F64": np.float64}
    expected = tensors()
    layout = safetensors_layout(blob)
    before = hashlib.sha256(blob.read_bytes()).hexdigest()

    for name, (dt, shape, begin, end) in layout.items():
        dtype = np.dtype(dtypes[dt])
        if (end - begin) != dtype.itemsize * int(np.prod(shape)):
            fail(f"{blob}: bad data_offsets for {name}")
        # Read-only shared mapping of the blob itself.
        m = np.memmap(blob, dtype=dtype, mode="r", offset=begin, shape=tuple(shape))
        if not np.array_equal(m, expected[name]):
            fail(f"numpy.memmap(mode='r') of {blob}: tensor {name} differs")
        del m
        # Private copy-on-write mapping: writable in memory, must never reach the file.
        m = np.memmap(blob, dtype=dtype, mode="c", offset=begin, shape=tuple(shape))
        if not np.array_equal(m, expected[name]):
            fail(f"numpy.memmap(mode='c') of {blob}: tensor {name} differs")
        m[...] = 0
        del m
    if hashlib.sha256(blob.read_bytes()).hexdigest() != before:
        fail(f"{blob} changed after writing to a copy-on-write (mode='c') mapping")

    if scratch_dir is None:
        return
    # Shared writable mapping on a scratch copy inside the cache: writes must reach the file.
    scratch_dir.mkdir(exist_ok=True)
    copy = scratch_dir / "model-copy.safetensors"
    shutil.copyfile(blob, copy)
    dt, shape, begin, _ = layout["weight"]
    m = np.memmap(copy, dtype=np.float32, mode="r+", offset=begin, shape=tuple(shape))
    m[0, :] = -1.0
    m.flush()
    del m
    raw = np.frombuffer(copy.read_bytes()[begin:begin + 4 * shape[1]], dtype=np.float32)
    if not np.all(raw == -1.0):
        fail(f"write through numpy.memmap(mode='r+') did not reach {copy}")
    check_rest = np.memmap(copy, dtype=np.float32, mode="r", offset=begin, shape=tuple(shape))
    if not np.array_equal(check_rest[1:], expected["weight"][1:]):
        fail(f"numpy.memmap(mode='r+') write on {copy} clobbered other rows")
    del check_rest
    shutil.rmtree(scratch_dir)


def check_layout(cache_dir: Path, state: HubState) -> list[Path]:
    """Check the on-disk cache structure; return the two shared.bin blob paths."""
    if not (cache_dir / ".locks").is_dir():
        fail(f"{cache_dir}/.locks does not exist")
    shared_blobs = []
    for repo, files in state.repos.items():
        org, name = repo.split("/")
        storage = cache_dir / f"models--{org}--{name}"
        commit = state.commits[repo]
        lock_dir = cache_dir / ".locks" / storage.name
        if not lock_dir.is_dir():
            fail(f"{lock_dir} does not exist")
        ref = storage / "refs" / "main"
        if not ref.is_file():
            fail(f"{ref} does not exist")
        if ref.read_text() != commit:
            fail(f"{ref} holds {ref.read_text()!r}, expected {commit!r}")
        if not (storage / "trees" / f"{commit}.json").is_file():
            fail(f"{storage}/trees/{commit}.json (tree listing cache) does not exist")
        blobs_dir = storage / "blobs"
        blob_names = sorted(os.listdir(blobs_dir)) if blobs_dir.is_dir() else []
        want_names = sorted(etag_of(p, d) for p, d in files.items())
        if blob_names != want_names:
            fail(f"{blobs_dir} holds {blob_names}, expected {want_names} (missing ones: symlink() unsupported, "
                 f"so files were moved into snapshots/? extra ones: leftover temporary files?)")
        snap = storage / "snapshots" / commit
        for path, data in files.items():
            blob = blobs_dir / etag_of(path, data)
            if blob.is_symlink() or not blob.is_file():
                fail(f"{blob} is not a regular file")
            if blob.read_bytes() != data:
                fail(f"{blob} content differs from what the server sent for {repo}/{path}")
            entry = snap / path
            if not os.path.lexists(entry):
                fail(f"{entry} is missing")
            if not entry.is_symlink():
                fail(f"{entry} is not a symlink (huggingface_hub fell back to copies: symlink() unsupported?)")
            target = os.readlink(entry)
            prefix = "../" * (path.count("/") + 2) + "blobs/"
            if target != prefix + blob.name:
                fail(f"{entry} -> {target!r}, expected relative link {prefix + blob.name!r}")
            if Path(os.path.realpath(entry)) != blob.resolve():
                fail(f"{entry} does not resolve to {blob}")
            if entry.read_bytes() != data:
                fail(f"reading through {entry} gives different bytes")
            if path == "shared.bin":
                shared_blobs.append(blob)
    leftovers = [str(p) for p in cache_dir.rglob("*") if p.name.endswith((".incomplete", ".tmp"))]
    if leftovers:
        fail(f"temporary files left in the cache: {leftovers[:5]}")
    return shared_blobs


# --------------------------------------------------------------------------- main


def expected_results(cache_dir: Path, repos: dict[str, dict[str, bytes]]) -> dict:
    """What run_downloads() must return for our fixture repos (the fixture is deterministic)."""
    def snap(repo: str) -> Path:
        org, name = repo.split("/")
        return cache_dir / f"models--{org}--{name}" / "snapshots" / commit_of(repo)

    digests = {}
    for key, repo in (("snap_a", "org/model-a"), ("snap_b", "org/model-b")):
        for path, data in repos[repo].items():
            digests[f"{key}/{path}"] = hashlib.sha256(data).hexdigest()
    digests["file_b"] = hashlib.sha256(repos["org/model-b"]["shared.bin"]).hexdigest()
    return {
        "snap_a": str(snap("org/model-a")),
        "file_b": str(snap("org/model-b") / "shared.bin"),
        "snap_b": str(snap("org/model-b")),
        "digests": dict(sorted(digests.items())),
    }


def evicted_child() -> int:
    """Offline, after the cache was evicted: every call must fail with huggingface_hub's
    normal "not in the local cache" error, never with a damaged file."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = {
        "snapshot_download(org/model-a)": lambda: snapshot_download("org/model-a"),
        "hf_hub_download(org/model-b, shared.bin)": lambda: hf_hub_download("org/model-b", "shared.bin"),
        "snapshot_download(org/model-b)": lambda: snapshot_download("org/model-b"),
    }
    for name, call in calls.items():
        try:
            got = call()
        except LocalEntryNotFoundError as e:
            print(f"{name}: not found ({type(e).__name__})")
            continue
        except Exception as e:
            print(f"{name}: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"{name}: returned {got} although the cache was evicted", file=sys.stderr)
        return 1
    return 0


def check_no_damaged_files(cache_dir: Path) -> int:
    """Every blob still in the cache has exactly the content its name (etag) promises."""
    checked = 0
    for p in cache_dir.rglob("*"):
        if p.is_symlink() or not p.is_file() or p.parent.name != "blobs":
            continue
        data = p.read_bytes()
        if len(p.name) == 64:
            ok = hashlib.sha256(data).hexdigest() == p.name
        else:
            ok = git_blob_sha1(data) == p.name
        if not ok:
            fail(f"{p} does not match its name: damaged or short ({len(data)} bytes)")
        checked += 1
    return checked


def run_offline_phase(cache_dir: Path, env: dict[str, str], expected: dict) -> None:
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--offline-child", str(cache_dir)],
                              env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        fail(f"offline phase timed out after {CHILD_TIMEOUT_S}s")
    if proc.returncode != 0:
        fail(f"offline phase failed (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if len(lines) != 1:
        fail(f"offline phase printed no result:\n{proc.stdout}\n{proc.stderr}")
    offline = json.loads(lines[0][len("RESULT "):])
    if offline != expected:
        fail(f"offline (HF_HUB_OFFLINE=1) results differ:\n  got:      {offline}\n  expected: {expected}")


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = {a for a in argv[1:] if a.startswith("--")}
    if flags - {"--no-mmap-write", "--offline-child", "--offline-only", "--evicted", "--evicted-child"} \
            or len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    if "--evicted-child" in flags:
        return evicted_child()
    if "--evicted" in flags:
        cache_dir = Path(args[0]).resolve()
        hf_home = Path(tempfile.mkdtemp(prefix="kcache-hf-home-"))
        env = hf_env(cache_dir, hf_home, "http://127.0.0.1:9", offline=True)
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--evicted-child", str(cache_dir)],
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
            if proc.returncode != 0:
                fail(f"after eviction (exit {proc.returncode}):\n{proc.stderr}{proc.stdout}")
            print(proc.stdout, end="")
            print(f"intact blobs left: {check_no_damaged_files(cache_dir)}")
            print("hf check: ok")
            return 0
        except CheckFailed as e:
            print(f"hf check: FAILED: {e}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(hf_home, ignore_errors=True)
    if "--offline-child" in flags:
        # Dump the child's stacks before the parent's timeout kills it silently.
        faulthandler.dump_traceback_later(CHILD_TIMEOUT_S - 5, exit=True)
        return offline_child(args[0])
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    offline_only = "--offline-only" in flags

    cache_dir = Path(args[0]).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    hf_home = Path(tempfile.mkdtemp(prefix="kcache-hf-home-"))
    t_start = time.monotonic()

    state = HubState(make_repos())
    expected = expected_results(cache_dir, state.repos)
    servers = None if offline_only else Servers(state)
    # Nothing listens there in --offline-only mode (and the servers are stopped before the
    # offline phase otherwise): any network attempt fails fast with "connection refused".
    endpoint = servers.endpoint if servers else "http://127.0.0.1:9"
    # huggingface_hub reads its configuration from the environment at import time, so the
    # environment is set before the first import.
    online_env = hf_env(cache_dir, hf_home, endpoint, offline=False)
    offline_env = hf_env(cache_dir, hf_home, endpoint, offline=True)
    os.environ.clear()
    os.environ.update(online_env)

    try:
        present = [p.name for p in cache_dir.glob("models--org--model-*")]
        if offline_only:
            if len(present) != 2:
                fail(f"--offline-only needs a cache filled by an earlier run; {cache_dir} has {present}")
        elif present:
            fail(f"{cache_dir} already holds {present}: the online check needs a cache without the test "
                 "repos (use a fresh directory, or --offline-only to re-check a filled one)")

        import huggingface_hub
        from huggingface_hub import constants

        if constants.HF_HUB_CACHE != str(cache_dir) or constants.ENDPOINT != endpoint:
            fail(f"huggingface_hub uses cache {constants.HF_HUB_CACHE} and endpoint {constants.ENDPOINT}, "
                 f"expected {cache_dir} and {endpoint}")

        if not offline_only:
            # ---- online phase
            online = run_downloads()
            first = state.snapshot_counts()
            expected_first = {f"{r}:{p}": 1 for r, files in state.repos.items() for p in files}
            if first != expected_first:
                fail(f"first downloads: bodies fetched {first}, expected each file once per repo {expected_first}")
            if online != expected:
                fail(f"downloads returned\n  {online}\nexpected\n  {expected}")
            again = run_downloads()
            if again != online:
                fail(f"second online run returned {again}, first returned {online}")
            if state.snapshot_counts() != first:
                fail(f"second online run re-downloaded cached files: {state.snapshot_counts()}")
            if state.unexpected:
                fail(f"fake Hub got unexpected requests: {state.unexpected}")

        shared_blobs = check_layout(cache_dir, state)
        check_safetensors(Path(expected["snap_a"]) / "model.safetensors")
        blob = Path(os.path.realpath(Path(expected["snap_a"]) / "model.safetensors"))
        write_mmap = not offline_only and "--no-mmap-write" not in flags
        check_memmap(blob, cache_dir / SCRATCH_NAME if write_mmap else None)
        t_online = time.monotonic()

        # ---- offline phase: no server at all, child process with HF_HUB_OFFLINE=1
        if servers:
            servers.stop()
        run_offline_phase(cache_dir, offline_env, expected)
        t_end = time.monotonic()

        print(f"hf: {'checks' if offline_only else 'online'} {t_online - t_start:.1f}s, "
              f"offline {t_end - t_online:.1f}s, huggingface_hub {huggingface_hub.__version__}")
        print(f"shared-bytes: {len(state.repos['org/model-b']['shared.bin'])}")
        for b in shared_blobs:
            print(f"shared-blob: {b}")
        if os.environ.get("KCACHE_PY_VERBOSE"):
            print("server request log:\n  " + "\n  ".join(state.log), file=sys.stderr)
        print("hf check: ok")
        return 0
    except CheckFailed as e:
        print(f"hf check: FAILED: {e}", file=sys.stderr)
    except Exception:
        import traceback

        traceback.print_exc()
        print("hf check: FAILED: unexpected exception (see traceback above)", file=sys.stderr)
    finally:
        if servers:
            servers.stop()
        shutil.rmtree(hf_home, ignore_errors=True)
    with state.lock:
        print("server request log:\n  " + "\n  ".join(state.log or ["(empty)"]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
