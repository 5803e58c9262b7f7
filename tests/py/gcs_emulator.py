"""gcp-storage-emulator for the gs:// tests (store/tests/objstores.rs), on HOST:PORT with one
bucket, in memory: `gcs_emulator.py HOST PORT BUCKET`.

object_store's GCS client speaks the XML API for objects, where the emulator (2026.7.19) is a
stub: downloads and uploads answer without ETag, x-goog-generation or Last-Modified (which
object_store requires), objects have no HEAD, buckets have no XML listing, uploads ignore
x-goog-if-generation-match, and a generation is a timestamp two quick writes can share. This wrapper adds exactly those, as
GCS documents them, at start-up rather than in a fork; everything else is the emulator's. So
the conditional-put behaviour that tag updates rely on is checked here against GCS's
documented semantics, reproduced below, not against Google's own implementation.
"""

import email.utils
import itertools
import sys
import threading
import time
from datetime import datetime
from http import HTTPStatus
from xml.sax.saxutils import escape

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

# Uploads evaluate their precondition and write under one lock, so that concurrent writers
# exclude each other as they do on GCS.
LOCK = threading.Lock()
# Generations: unique and increasing, as on GCS.
GENERATIONS = itertools.count(int(time.time() * 1_000_000))

CONDITION_NOT_MET = (
    "<?xml version='1.0' encoding='UTF-8'?><Error><Code>ConditionNotMet</Code>"
    "<Message>At least one of the pre-conditions you specified did not hold.</Message></Error>"
)


def version_headers(response, obj):
    gen = str(obj["generation"])
    response["ETag"] = '"{}"'.format(gen)
    response["x-goog-generation"] = gen
    try:
        updated = datetime.fromisoformat(str(obj.get("updated")).replace("Z", "+00:00"))
        response["Last-Modified"] = email.utils.format_datetime(updated, usegmt=True)
    except ValueError:
        response["Last-Modified"] = email.utils.formatdate(usegmt=True)


def current(storage, request):
    try:
        return storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        return None


def xml_upload(request, response, storage, *args, **kwargs):
    want = request.get_header("x-goog-if-generation-match")
    with LOCK:
        have = current(storage, request)
        if want is not None and want != (str(have["generation"]) if have else "0"):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.write(CONDITION_NOT_MET)
            return
        objects.xml_upload(request, response, storage, *args, **kwargs)
        if response.status != HTTPStatus.OK:
            return
        obj = current(storage, request)
        obj["generation"] = str(next(GENERATIONS))
        storage.patch_object(request.params["bucket_name"], request.params["object_id"], obj)
        version_headers(response, obj)


def download(request, response, storage, *args, **kwargs):
    objects.download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = current(storage, request)
        if obj is not None:
            version_headers(response, obj)


def head(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    # The headers of a GET, with its length and no body.
    response.head_length = len(response._content)
    response._content = b""


def xml_list(request, response, storage, *args, **kwargs):
    """ListObjectsV2 (`GET /bucket?list-type=2&prefix=...`), which object_store lists with:
    keys under the prefix in order, a thousand a page."""
    bucket = request.params["bucket_name"]
    q = lambda k: (request.query.get(k) or [""])[0]
    prefix, after = q("prefix"), q("continuation-token") or q("start-after")
    with LOCK:
        if bucket not in storage.buckets:
            response.status = HTTPStatus.NOT_FOUND
            response.write(
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchBucket</Code>"
                "<Message>The specified bucket does not exist.</Message></Error>"
            )
            return
        items = sorted(
            (k, o) for k, o in storage.objects.get(bucket, {}).items()
            if k.startswith(prefix) and k > after
        )
    page, more = items[:1000], len(items) > 1000
    out = ["<?xml version='1.0' encoding='UTF-8'?><ListBucketResult>"]
    for key, obj in page:
        updated = str(obj.get("updated") or "1970-01-01T00:00:00Z")
        out.append(
            "<Contents><Key>{}</Key><Size>{}</Size><LastModified>{}</LastModified>"
            "<ETag>\"{}\"</ETag></Contents>".format(
                escape(key), obj.get("size", 0), escape(updated), obj["generation"]
            )
        )
    if more:
        out.append("<NextContinuationToken>{}</NextContinuationToken>".format(escape(page[-1][0])))
    out.append("</ListBucketResult>")
    response["Content-type"] = "application/xml"
    response.write("".join(out))


original_close = server.Response.close


def close(self):
    length = getattr(self, "head_length", None)
    if length is None:
        return original_close(self)
    self._handler.send_response(self.status.value, self.status.phrase)
    for k, v in self._headers.items():
        self._handler.send_header(k, v)
    self._handler.send_header("Content-Length", str(length))
    self._handler.end_headers()


def main():
    host, port, bucket = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for _, handlers in server.HANDLERS:
        if handlers.get(server.PUT) is objects.xml_upload:
            handlers[server.PUT] = xml_upload
            handlers[server.GET] = download
            handlers["HEAD"] = head
    server.HANDLERS = server.HANDLERS + ((r"^/(?P<bucket_name>[-.\w]+)/?$", {server.GET: xml_list}),)
    server.Response.close = close
    server.RequestHandler.do_HEAD = lambda self: server.Router(self).handle("HEAD")
    srv = server.create_server(host, port, in_memory=True, default_bucket=bucket)
    srv.start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
