"""An OpenAI-compatible HTTP server over ExecuTorch programs (``et-transformers serve``).

The server runs each request on a *slot*, one loaded copy of the program with its own KV cache,
and reuses what a slot's cache holds for the next prompt that starts with the same tokens (a chat
that re-sends its history prefills only its new turn). :mod:`.app` owns the routes,
:mod:`.schemas` the pydantic request and response bodies, :mod:`.translation` the mapping between
OpenAI fields and ``generate()`` options, :mod:`.slots` the programs, the prompt cache across
requests and the wait queue, :mod:`.metrics` the Prometheus metrics. It needs the ``serve`` extra
(``pip install 'et-transformers[serve]'``); the library never imports this package.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from .app import create_app
from .slots import load_slots

__all__ = ["create_app", "load_slots", "run", "running"]


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C, SIGTERM).

    Args:
        app: from :func:`create_app`.
        host: address to bind (loopback unless told otherwise).
        port: TCP port.
        log_level: uvicorn's log level (``"info"`` logs every request).
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(app, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread for the duration of a ``with`` block
    (tests, benchmarks, notebooks); yields the base URL (``http://host:port``).

    Args:
        app: from :func:`create_app`.
        host: address to bind.
        port: TCP port; 0 picks a free one.
        timeout: seconds to wait for the server to start, and to stop at the end of the block.

    Raises:
        RuntimeError: the server did not start within ``timeout``.
    """
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="et-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not server.started:
            raise RuntimeError(f"the server did not start on {host}:{sock.getsockname()[1]} within {timeout} s.")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
