"""TLS in front of waitress, in the server's own process and on the server's own port.

waitress speaks plain HTTP only. The server's port answers both: a connection whose first
byte is a TLS handshake record (0x16; no HTTP request starts with it) is handed by waitress'
I/O thread to this terminator, which runs one asyncio loop in one thread. After the handshake
it opens a socket pair, gives one end to waitress as a new connection with the client's
address and ``wsgi.url_scheme = "https"``, and copies bytes both ways with flow control. So
waitress' limits (body size, request and idle timeouts, connection limit, ``/healthz`` in the
I/O loop) hold for HTTPS unchanged, and a plain-HTTP connection costs one ``MSG_PEEK`` more.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

log = logging.getLogger("edge_demo.tls")
HANDSHAKE_RECORD = b"\x16"
BUFFER_HIGH = 256 * 1024  # bytes buffered for a slow side before the other side stops reading
RENEW_EVERY_S = 60.0
WARN_EVERY_S = 60.0


class _Handshaking:
    """Stands in waitress' socket map for a connection in its TLS handshake, so that it counts
    against the connection limit (it is never polled: neither readable nor writable)."""

    accepting = False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _End(asyncio.Protocol):
    """One side of a relayed connection: what it receives is written to its peer's side."""

    def __init__(self):
        self.transport = None
        self.peer: _End | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=BUFFER_HIGH)

    def link(self, peer: _End) -> None:
        self.peer = peer
        for data in self._early:
            peer.transport.write(data)
        self._early = []

    def data_received(self, data):
        if self.peer is None:
            self._early.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self):
        return False  # close this side; connection_lost closes the other once it is flushed

    def pause_writing(self):
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        if self.peer is not None and not self.peer.transport.is_closing():
            self.peer.transport.close()  # sends what is buffered, then closes


class TlsFront:
    """Terminates TLS for connections the server hands over (see the module docstring)."""

    def __init__(self, server, context: ssl.SSLContext, handshake_timeout: float,
                 renew: Callable[[], ssl.SSLContext | None] | None = None):
        self.server = server
        self.context = context
        self.handshake_timeout = float(handshake_timeout)
        self.renew = renew
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._keys = itertools.count()
        self._failed: dict[str, int] = {}
        self._warned = 0.0
        self._thread = threading.Thread(target=self._run, name="edge-demo-tls", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        if self.renew is not None:
            self.loop.call_later(RENEW_EVERY_S, self._schedule_renew)
        try:
            self.loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.close()

    # --- called in waitress' I/O thread ------------------------------------------------
    def take(self, sock: socket.socket, addr) -> None:
        """Hand over a connection whose first byte is a TLS record (from waitress' I/O
        thread, which owns the socket map)."""
        key = ("tls-handshake", next(self._keys))
        self.server._map[key] = _Handshaking()
        self.loop.call_soon_threadsafe(self._spawn, sock, addr, key)

    # --- the relay's own thread --------------------------------------------------------
    def _spawn(self, sock, addr, key) -> None:
        self.loop.create_task(self._serve(sock, addr, key))

    async def _serve(self, sock: socket.socket, addr, key) -> None:
        tls = _End()
        try:
            await self.loop.connect_accepted_socket(
                lambda: tls, sock, ssl=self.context,
                ssl_handshake_timeout=self.handshake_timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.server.release(key)
            sock.close()
            self._handshake_failed(exc)
            return
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        plain = _End()
        try:
            await self.loop.connect_accepted_socket(lambda: plain, theirs)
        except OSError:
            self.server.release(key)
            ours.close()
            theirs.close()
            tls.transport.abort()
            return
        tls.link(plain)
        plain.link(tls)
        self.server.adopt(ours, addr, key)

    def _handshake_failed(self, exc: BaseException) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        self._failed[reason] = self._failed.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            counts = ", ".join(f"{n} x {r}" for r, n in self._failed.items())
            self._failed = {}
            hint = (" (a phone that does not trust this server's CA yet: open /trust over"
                    " plain http:// on it)" if "UNKNOWN_CA" in counts.upper()
                    or "CERTIFICATE" in counts.upper() else "")
            log.warning("TLS handshakes failed: %s%s", counts, hint)

    def _schedule_renew(self) -> None:
        async def renew():
            try:
                context = await self.loop.run_in_executor(None, self.renew)
            except Exception:  # noqa: BLE001 - keep serving with the certificate we have
                log.exception("could not renew the server certificate")
                context = None
            if context is not None:
                self.context = context  # new connections use it; open ones keep theirs
            self.loop.call_later(RENEW_EVERY_S, self._schedule_renew)

        self.loop.create_task(renew())

    @staticmethod
    def _loop_error(loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (OSError, ConnectionError, asyncio.CancelledError)):
            return  # a client that went away mid-stream: nothing to act on
        loop.default_exception_handler(context)
