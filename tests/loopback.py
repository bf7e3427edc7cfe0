"""A folder served over loopback HTTP (a zoo mirror in tests), recording what was asked for."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RecordingServer(http.server.ThreadingHTTPServer):
    """Serves ``folder`` on 127.0.0.1 (a free port) and records the paths it was asked for."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        super().__init__(("127.0.0.1", 0), handler)
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serving(folder: Path) -> Iterator[RecordingServer]:
    """A :class:`RecordingServer` of ``folder`` running in a thread while the block runs."""
    server = RecordingServer(folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
