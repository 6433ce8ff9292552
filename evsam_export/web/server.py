"""A small static file server on 127.0.0.1 with the cross-origin isolation headers, in a background thread.

The browser runner serves the model and onnxruntime-web files through it (Playwright's request interception
was measured 16 s for a 20 MB decoder: every body crosses the DevTools protocol as base64), and tensors
cross it as raw bytes under BLOB_PREFIX: the page GETs its inputs and POSTs its outputs, which `blobs` holds
until the caller takes them. Only files under a mounted folder are served; everything else is a 404.
"""

from __future__ import annotations

import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from evsam_export.web import CROSS_ORIGIN_ISOLATION_HEADERS

BLOB_PREFIX = "/__blobs__/"
CONTENT_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                 ".html": "text/html; charset=utf-8", ".json": "application/json", ".onnx": "application/octet-stream"}


class _Handler(SimpleHTTPRequestHandler):
    mounts: dict[str, Path] = {}
    blobs: dict[str, bytes | bytearray] = {}
    accept_blobs = True
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **CONTENT_TYPES}

    def translate_path(self, path: str) -> str:
        path = unquote(urlsplit(path).path)
        if path.endswith("/"):
            path += "index.html"
        for prefix, folder in sorted(self.mounts.items(), key=lambda item: -len(item[0])):
            if path.startswith(prefix):
                file = (folder / path[len(prefix):]).resolve()
                if file.is_relative_to(folder) and file.is_file():
                    return str(file)
        return str(Path("/nonexistent/evsam-export") / "missing")  # SimpleHTTPRequestHandler answers 404

    def do_GET(self) -> None:
        if not self.path.startswith(BLOB_PREFIX):
            return super().do_GET()
        body = self.blobs.pop(self.path[len(BLOB_PREFIX):], None)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if not self.accept_blobs or not self.path.startswith(BLOB_PREFIX):
            return self.send_error(405)
        # A bytearray, so the arrays a runner builds on it are writable like any runtime's outputs.
        body = bytearray(int(self.headers.get("Content-Length", 0)))
        view, filled = memoryview(body), 0
        while filled < len(body):
            count = self.rfile.readinto(view[filled:])
            if not count:
                return self.send_error(400, "body shorter than Content-Length")
            filled += count
        self.blobs[self.path[len(BLOB_PREFIX):]] = body
        self.send_response(204)
        self.end_headers()

    def list_directory(self, path):  # never list folders
        self.send_error(404)
        return None

    def end_headers(self) -> None:
        for name, value in CROSS_ORIGIN_ISOLATION_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        pass


class FolderServer:
    """Serve `mounts` (URL prefix "/ort-web/" -> folder; a URL ending in "/" serves its index.html) on
    `host`:`port` (0: any free port) until close(). accept_blobs=False refuses POSTs: `serve` holds no tensors.
    A port in use raises OSError (errno EADDRINUSE) from the constructor."""

    def __init__(self, mounts: dict[str, Path], port: int = 0, host: str = "127.0.0.1", accept_blobs: bool = True) -> None:
        self.blobs: dict[str, bytes | bytearray] = {}
        handler = type("MountedHandler", (_Handler,), {"mounts": {p: Path(f).resolve() for p, f in mounts.items()}, "blobs": self.blobs,
                                                       "accept_blobs": accept_blobs})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="evsam-web-server", daemon=True)
        self._thread.start()

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
