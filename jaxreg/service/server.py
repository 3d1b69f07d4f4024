"""Running the reference service: in-process (tests, the demo) or from the command line.

Example:
  >>> import tempfile
  >>> import jaxreg as jr
  >>> from jaxreg import service
  >>> with service.start(state_dir=tempfile.mkdtemp()) as server:   # a free 127.0.0.1 port
  ...     with jr.remote.ServiceClient(server.url) as client:
  ...         print(client.healthz())
  {'status': 'ok'}

``jaxreg serve --host 127.0.0.1 --port 8000`` runs it in the foreground; Ctrl-C (or
SIGTERM) shuts it down gracefully: uvicorn stops accepting connections, in-flight
requests finish, then the engine's queued work completes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from pathlib import Path

from jaxreg.service.app import create_app
from jaxreg.service.engine import Engine

logger = logging.getLogger("jaxreg.service")


class Server:
    """A running service: ``url``, ``engine``, and ``stop()`` (also a context manager)."""

    def __init__(self, engine: Engine, app, sock: socket.socket, *, log_level: str = "warning"):
        try:
            import uvicorn
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "jaxreg.service needs starlette and uvicorn: pip install 'jaxreg[service]'"
            ) from e

        self.engine = engine
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        # log_config=None: uvicorn must not reconfigure the process's logging (it would
        # replace the handlers of the application, or of pytest, that embeds it).
        config = uvicorn.Config(
            app, log_level=log_level, access_log=False, lifespan="off", log_config=None
        )
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread: threading.Thread | None = None

    def start_background(self) -> Server:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"jaxreg service failed to start on {self.url}")
            self._thread.join(0.01)
        return self

    def serve_forever(self) -> None:
        """Serves in the calling thread until interrupted (uvicorn handles signals)."""
        try:
            self._server.run(sockets=[self._sock])
        finally:
            self.engine.close()

    def stop(self) -> None:
        """Stops accepting requests, lets in-flight ones finish, then stops the engine."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self._sock.close()
        self.engine.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server(url={self.url!r})"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only
    # for sockets that say they are TCP; without it every response waits ~40 ms for a
    # delayed ACK (Nagle's algorithm).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_key: str | None = None,
    state_dir: str | os.PathLike | None = None,
    engine: Engine | None = None,
    log_level: str = "warning",
    max_body_bytes: int = 256 << 20,
    allow_unauthenticated: bool = False,
    **engine_kwargs,
) -> Server:
    """Builds the engine and binds the socket (``port=0`` picks a free port).

    ``engine_kwargs`` (``max_tokens``, ``checkpoint_path``, ``limits``) go to
    ``Engine``; ``max_body_bytes`` caps request bodies.

    Raises:
      PermissionError: ``host`` is not a loopback address and there is no ``api_key``
        (pass ``allow_unauthenticated=True`` to serve the network without one).
    """
    if not _is_loopback(host):
        if not api_key and not allow_unauthenticated:
            raise PermissionError(
                f"refusing to listen on {host} (not loopback) without an API key: set one "
                "(jaxreg serve reads $JAXREG_API_KEY), or pass allow_unauthenticated=True "
                "(--allow-unauthenticated) to accept requests from anyone who can reach it"
            )
        logger.warning("jaxreg service: listening on %s, not only on loopback", host)
    sock = _bind(host, port)  # first: a busy port fails before the model is loaded
    if engine is None:
        state = Path(state_dir) if state_dir is not None else Path("jaxreg-states")
        try:
            engine = Engine(state, **engine_kwargs)
        except BaseException:
            sock.close()
            raise
    app = create_app(engine, api_key=api_key, max_body_bytes=max_body_bytes)
    return Server(engine, app, sock, log_level=log_level)


def start(host: str = "127.0.0.1", port: int = 0, **kwargs) -> Server:
    """Starts the service in a background thread and returns once it accepts requests."""
    return create_server(host, port, **kwargs).start_background()
