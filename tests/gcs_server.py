"""A real GCS-protocol server for tests, and a proxy that makes it flaky.

`Emulator` runs `gcp-storage-emulator` (PyPI) in memory on a free loopback
port (without its per-write dump of all metadata, and without soft deletes). `FlakyProxy` forwards every request to it, answering some with HTTP 503
instead, as a real bucket under load does; the stack must retry them.

The proxy also gives the emulator two things GCS has and it lacks:
- the `x-goog-generation` / `x-goog-metageneration` headers on object media,
  from which TensorStore reads an object's generation (without them it fails,
  "Malformed StorageGeneration", once an object is read back), always the
  generation of the bytes sent with it;
- `ifGenerationMatch` preconditions on writes and deletes (412 when they do
  not hold), checked and applied atomically: the conditional create that
  leases rely on.
Server-side copies it does have: objects.rewrite (what gcsfs's `copy` and
`cp_file` issue) and objects.copy give the copy the source's size and a new
generation, so the proxy passes them through.

`read_only` names buckets whose writes and deletes the proxy answers with
HTTP 403, as a bucket the job's service account may only read.

The proxy also counts, as the server sees them, bytes written into buckets:
`bytes_uploaded`, the request bodies of object uploads (JSON API
/upload/..., resumable parts, XML PUTs), and `bytes_rewritten`, the sizes of
objects copied server-side (rewrite, copyTo), which cost no upload; and
`requests`, every request a client sent (what GCS bills and rate-limits).
Read them with `counters()`, zero them with `reset_counters()`.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import re
import urllib.parse
import socket
import subprocess
import sys
import threading
import time
import urllib.request

OBJECT_PATH = re.compile(r'^(?:/upload)?/storage/v1/b/([^/?]+)/o(?:/([^?]+))?')
COPY_PATH = re.compile(r'^/storage/v1/b/[^/]+/o/[^?]+/(?:rewriteTo|copyTo)/b/')
MEDIA_PATH = re.compile(r'^(?:/download)?(/storage/v1/b/[^/]+/o/[^?]+)\?(?:.*&)?alt=media')
HOP_BY_HOP = {'connection', 'keep-alive', 'transfer-encoding', 'te', 'trailer', 'upgrade',
              'proxy-authorization', 'proxy-authenticate', 'content-length'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# The emulator, started in memory with two of its costs taken away. It writes
# every object's metadata of every bucket out as one JSON file on each write
# (to persist it, which in memory is for nothing): a write's cost grew with all
# a session had stored, and GCS tests late in the suite took minutes. And it
# keeps a deleted object's bytes for a week of soft delete, which no test reads.
_EMULATOR = '''
from gcp_storage_emulator import storage
if hasattr(storage.Storage, "_write_config_to_file"):
    storage.Storage._write_config_to_file = lambda self: None
storage.DEFAULT_SOFT_DELETE_RETENTION_SECONDS = 0
from gcp_storage_emulator.__main__ import main
main()
'''


class Emulator:
  def __init__(self):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    exe = [sys.executable, '-c', _EMULATOR]
    self.process = subprocess.Popen(
        exe + ['start', '--host=127.0.0.1', f'--port={self.port}', '--in-memory'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(self.url + '/storage/v1/b?project=test', timeout=1)
        return
      except OSError:
        if time.time() > deadline or self.process.poll() is not None:
          self.stop()
          raise RuntimeError('gcp-storage-emulator did not start')
        time.sleep(0.2)

  def stop(self):
    self.process.kill()
    self.process.wait()


class FlakyProxy:
  """Forwards to `upstream`; while `fail_every` is n > 0, every n-th request gets a 503."""

  def __init__(self, upstream_port: int):
    self.fail_every = 0
    self.failed = 0
    self.read_only: set[str] = set()  # buckets whose writes and deletes get HTTP 403
    self._count = 0
    self._lock = threading.Lock()
    self._objects_lock = threading.Lock()
    self.bytes_uploaded = 0
    self.bytes_rewritten = 0
    self.requests = 0  # every request a client sent, answered or failed
    self.sent: list[str] = []  # those requests, 'METHOD path', since the last reset
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):
        pass

      def _error(self, code: int, message: str):
        payload = json.dumps({'error': {'code': code, 'message': message}}).encode()
        self.send_response(code)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def _forward(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        if proxy._should_fail():
          self._error(503, 'injected by FlakyProxy')
          return
        match = OBJECT_PATH.match(self.path)
        if (self.command in ('POST', 'PUT', 'PATCH', 'DELETE') and match
            and match.group(1) in proxy.read_only):
          self._error(403, 'Forbidden: this account may not write to the bucket (FlakyProxy)')
          return
        conn = http.client.HTTPConnection('127.0.0.1', upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        with proxy._precondition(self.command, self.path, conn) as holds:
          if not holds:
            self._error(412, 'Precondition Failed')
            return
          response, payload, extra = proxy._send(conn, self.command, self.path, body, headers)
        proxy._count_bytes(self.command, self.path, len(body), response.status, payload)
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders() + extra:
          if k.lower() not in HOP_BY_HOP | {'server', 'date'}:
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(payload)
        conn.close()

      def _handle(self):
        with proxy._lock:
          proxy.requests += 1
          proxy.sent.append(f'{self.command} {self.path}')
        try:
          self._forward()
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up on this request (its own timeout or retry)

      do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
          super().handle_error(request, client_address)  # a client hanging up is no error

    self.server = Server(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  @contextlib.contextmanager
  def _precondition(self, method, path, conn):
    """Yields whether an `ifGenerationMatch` on a write or delete holds. Every
    object write, with its check, and every media read, with the read of its
    generation, runs under one lock: racing creates see each other, and no
    write lands between a read's bytes and its generation (old bytes paired
    with a new generation let an OCDBT writer overwrite a commit it never
    saw). The emulator serves one request at a time anyway."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    match = OBJECT_PATH.match(path)
    writes = method in ('POST', 'PUT', 'PATCH', 'DELETE') and match
    if not writes and not (method in ('GET', 'HEAD') and MEDIA_PATH.match(path)):
      yield True
      return
    with self._objects_lock:
      if not writes or 'ifGenerationMatch' not in query or COPY_PATH.match(path):
        yield True
        return
      name = match.group(2) or urllib.parse.quote(query.get('name', [''])[0], safe='')
      conn.request('GET', f'/storage/v1/b/{match.group(1)}/o/{name}')
      meta = conn.getresponse()
      body = meta.read()
      generation = int(json.loads(body)['generation']) if meta.status == 200 else 0
      yield generation == int(query['ifGenerationMatch'][0])

  @staticmethod
  def _send(conn, method, path, body, headers):
    """(response, payload, extra headers): the upstream's answer, and for
    object media the generation headers GCS sends and the emulator does not."""
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    match = MEDIA_PATH.match(path) if method in ('GET', 'HEAD') else None
    if not match or response.status not in (200, 206):
      return response, payload, []
    conn.request('GET', match.group(1))
    meta = conn.getresponse()
    info = meta.read()
    if meta.status != 200:
      return response, payload, []
    info = json.loads(info)
    return response, payload, [('x-goog-generation', info['generation']),
                               ('x-goog-metageneration', info['metageneration'])]

  def _count_bytes(self, method, path, body_size, status, payload) -> None:
    """Add a forwarded request's bytes to the counters (see the module doc)."""
    if method not in ('POST', 'PUT') or status >= 400:
      return
    rewritten = 0
    if method == 'POST' and COPY_PATH.match(path):
      info = json.loads(payload)  # a rewriteResponse, or (copyTo) the new object
      rewritten = int(info.get('totalBytesRewritten', info.get('size', 0)))
    xml_put = method == 'PUT' and not path.startswith(('/storage/', '/upload/', '/batch/'))
    with self._lock:
      self.bytes_rewritten += rewritten
      if path.startswith('/upload/') or xml_put:
        self.bytes_uploaded += body_size

  def counters(self) -> dict[str, int]:
    with self._lock:
      return {'bytes_uploaded': self.bytes_uploaded, 'bytes_rewritten': self.bytes_rewritten,
              'requests': self.requests}

  def reset_counters(self) -> dict[str, int]:
    """Zero the counters; what they held."""
    with self._lock:
      held = {'bytes_uploaded': self.bytes_uploaded, 'bytes_rewritten': self.bytes_rewritten,
              'requests': self.requests}
      self.bytes_uploaded = self.bytes_rewritten = self.requests = 0
      self.sent = []
      return held

  def _should_fail(self) -> bool:
    with self._lock:
      self._count += 1
      if self.fail_every and self._count % self.fail_every == 0:
        self.failed += 1
        return True
      return False

  def stop(self):
    self.server.shutdown()


@contextlib.contextmanager
def serving():
  """The server behind its proxy for as long as the block runs, this process
  pointed at the proxy (`storage.use_gcs_emulator`); the proxy. For the
  benchmarks: the tests' own fixture is `conftest.gcs`."""
  from pipeline import storage  # pylint: disable=g-import-not-at-top
  emulator = Emulator()
  proxy = FlakyProxy(emulator.port)
  try:
    storage.use_gcs_emulator(proxy.url)
    yield proxy
  finally:
    proxy.stop()
    emulator.stop()
