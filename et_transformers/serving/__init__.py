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

from .app import create_app
from .slots import load_slots

__all__ = ["create_app", "load_slots", "run"]


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
