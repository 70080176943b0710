"""The waitress server for the demo, set up so that hostile or heavy clients cannot hurt it.

* Request bodies are limited at the server (``max_body`` bytes; larger -> 413 JSON before the
  body is read) and kept in memory: waitress would otherwise spool any body over 512 kB to a
  temporary file. Responses are buffered in memory too. Nothing of a request touches the disk.
* A request must arrive completely within ``request_timeout`` seconds of its first byte
  (slow senders get 408 and are closed), an idle keep-alive connection is closed after
  ``idle_timeout`` seconds, and up to ``connection_limit`` connections are accepted, so a few
  hundred slow clients cannot fill the connection table.
* ``GET /healthz`` is answered by the I/O loop itself, never queued behind the worker threads
  (liveness must not depend on how busy the model is; ``/readyz`` goes through the app).
* With :meth:`DemoServer.enable_tls` the same port also answers HTTPS: a connection that
  starts with a TLS record goes to ``edge_demo.tls.TlsFront`` and comes back as a plain
  connection with the client's address and ``wsgi.url_scheme = "https"``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, WSGITask

from .errors import EdgeDemoError

REQUEST_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 15.0
CONNECTION_LIMIT = 1000
HEALTHZ_BODY = b'{"status":"ok"}\n'
# Bytes per read of a connection (waitress: 8 kB). Each pass of waitress' I/O loop visits every
# open connection, so a 67 kB photo read in 8 kB pieces costs 9 passes; 64 kB (under glibc's
# 128 kB mmap threshold, so no page faults per read) takes 2.
RECV_BYTES = 64 * 1024


def too_large_message(limit: int) -> str:
    """The 413 message for a body over ``limit`` bytes (the same from waitress and Flask)."""
    return (f"The upload is larger than the limit of {limit:,} bytes"
            f" ({limit / 1024 / 1024:.3g} MB). Send a smaller photo.")


def _json_error(status: int, reason: str, code: str, message: str,
                close: bool = True) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message, "request_id": None}}
                      ).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


class _JsonErrorTask(ErrorTask):
    """waitress' own errors (body too large, bad framing) as the API's JSON error body."""

    def execute(self):
        e = self.request.error
        if e.code == 413:
            code, message = "request_entity_too_large", too_large_message(
                self.channel.server.adj.max_request_body_size)
        else:
            code = e.reason.lower().replace(" ", "_")
            message = f"{e.reason}: {e.body}"
        body = json.dumps({"error": {"code": code, "message": message,
                                     "request_id": None}}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Task(WSGITask):
    """waitress closes the connection after every 304 and 204 (it closes any HTTP/1.1
    response without a Content-Length, and those may not carry one). They have no body, so
    the connection can stay open: a repeat visit revalidates its files with one 304 each, and
    over HTTPS a closed connection costs a new TLS handshake."""

    _bodiless = False

    def build_response_header(self):
        self._bodiless = (not self.has_body and self.version == "1.1"
                          and self.request.headers.get("CONNECTION", "").lower() != "close")
        try:
            return super().build_response_header()
        finally:
            self._bodiless = False

    def set_close_on_finish(self) -> None:
        if not self._bodiless:
            super().set_close_on_finish()


class _Channel(HTTPChannel):
    """Records when the request being read started, for the server's read deadline, and keeps
    the I/O loop from spinning on a connection whose worker is writing its response."""

    error_task_class = _JsonErrorTask
    task_class = _Task
    request_started: float | None = None
    _writing = False

    def received(self, data):
        if self.request is None and data:
            self.request_started = time.monotonic()
        return super().received(data)

    def write_soon(self, data):
        # The worker appends its response and sends it itself. Its send releases the GIL with
        # the bytes still counted as unsent; waitress' I/O loop would see the connection as
        # writable, fail to take the buffer's lock, and poll again at once, over and over,
        # until the worker is back (7 extra loop passes per request, measured). Whatever the
        # worker cannot send, it hands to the loop by pulling the trigger after this returns.
        self._writing = True
        try:
            return super().write_soon(data)
        finally:
            self._writing = False

    def writable(self):
        if self._writing and self.total_outbufs_len <= self.adj.outbuf_high_watermark:
            return False  # above the watermark the worker waits for the loop to drain it
        return super().writable()


class _SniffingChannel(_Channel):
    """A connection on a server that also answers HTTPS: its first byte decides. A TLS
    handshake record goes to the TLS front (waitress forgets the socket); anything else is
    plain HTTP, read as before."""

    _sniffed = False

    def handle_read(self):
        if not self._sniffed:
            try:
                first = self.socket.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return
            except OSError:
                first = b""
            self._sniffed = True
            if first[:1] == b"\x16":
                sock, self.socket = self.socket, None
                self.del_channel()
                self.connected = False
                self.server.tls.take(sock, self.addr)
                return
        super().handle_read()


class _HttpsParser(HTTPRequestParser):
    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        self.url_scheme = "https"


class _HttpsChannel(_Channel):
    """The plain end of a connection the TLS front decrypts: requests are https."""

    parser_class = _HttpsParser


def _wants_close(request) -> bool:
    conn = request.headers.get("CONNECTION", "").lower()
    return conn == "close" or (request.version == "1.0" and conn != "keep-alive")


class DemoServer(TcpWSGIServer):
    """waitress' TCP server with a read deadline and an I/O-loop ``/healthz``."""

    channel_class = _Channel
    tls = None  # the TlsFront when the port also answers HTTPS

    def __init__(self, app, adj: Adjustments, request_timeout: float):
        self.request_timeout = float(request_timeout)
        self._stop = threading.Event()
        # listening from here on: early connections wait in the backlog until the loop runs
        super().__init__(app, map={}, adj=adj, sockinfo=adj.listen[0])

    def bind_server_socket(self) -> None:
        try:
            super().bind_server_socket()
        except OSError:  # close what __init__ opened before the failed bind
            self.socket.close()
            self.trigger.close()
            raise

    def enable_tls(self, front) -> None:
        """Answer HTTPS on this port too, through ``front`` (an ``edge_demo.tls.TlsFront``)."""
        self.tls = front
        self.channel_class = _SniffingChannel
        front.start()

    def adopt(self, sock: socket.socket, addr, key) -> None:
        """From the TLS front's thread: serve ``sock`` (the plain end of a decrypted
        connection from ``addr``) in place of the handshake placeholder ``key``."""
        def thunk():
            self._map.pop(key, None)
            if self._stop.is_set():
                sock.close()
            else:
                _HttpsChannel(self, sock, addr, self.adj, map=self._map)
        self._call_in_loop(thunk, sock)

    def release(self, key) -> None:
        """From the TLS front's thread: a handshake failed; free its place."""
        self._call_in_loop(lambda: self._map.pop(key, None))

    def _call_in_loop(self, thunk, sock: socket.socket | None = None) -> None:
        try:
            self.trigger.pull_trigger(thunk)
        except OSError:  # the loop has stopped
            if sock is not None:
                sock.close()

    def add_task(self, channel) -> None:
        request = channel.requests[0] if channel.requests else None
        if (request is not None and not request.error and request.command == "GET"
                and request.path == "/healthz"):
            # Called with the channel's requests_lock held and no other request of this
            # channel in flight, so answering here keeps responses in order.
            close = _wants_close(request) or not channel.connected
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(HEALTHZ_BODY)}\r\nServer: {self.adj.ident}\r\n"
                    + ("Connection: close\r\n" if close else "") + "\r\n")
            if channel.connected:
                channel.write_soon(head.encode() + HEALTHZ_BODY)
            request.close()
            channel.requests.pop(0)
            if close:
                channel.close_when_flushed = True
                channel.requests = []
            self.pull_trigger()
            if channel.requests:
                self.add_task(channel)
            return
        super().add_task(channel)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # closes connections idle for longer than idle_timeout
        cutoff = time.monotonic() - self.request_timeout
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if (channel.request is not None and not channel.requests and started is not None
                    and started < cutoff and not channel.will_close
                    and not channel.close_when_flushed):
                channel.request_started = None
                try:
                    channel.write_soon(_json_error(
                        408, "Request Timeout", "request_timeout",
                        f"The request did not arrive within {self.request_timeout:g} s of its"
                        " first byte; send it again on a faster connection."))
                except Exception:  # noqa: BLE001 - the client may already be gone
                    channel.will_close = True
                channel.close_when_flushed = True

    def shutdown(self) -> None:
        """Release the socket and the worker threads of a server that never ran."""
        if self.tls is not None:
            self.tls.stop()
        self.task_dispatcher.shutdown()
        self.close()

    def stop(self) -> None:
        """Stop the loop started by :meth:`serve_forever` from another thread."""
        self._stop.set()
        self.pull_trigger()

    def serve_forever(self) -> None:
        """Run the I/O loop until :meth:`stop` (or Ctrl-C); then close every connection."""
        from waitress import wasyncore

        try:
            while not self._stop.is_set():
                wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map,
                               use_poll=True, count=1)
        except (SystemExit, KeyboardInterrupt):
            pass
        finally:
            self._stop.set()
            if self.tls is not None:
                self.tls.stop()
            self.task_dispatcher.shutdown()
            wasyncore.close_all(self._map)


def make_server(app, *, host: str = "127.0.0.1", port: int = 8080, threads: int = 4,
                max_body: int, request_timeout: float = REQUEST_TIMEOUT_S,
                idle_timeout: float = IDLE_TIMEOUT_S,
                connection_limit: int = CONNECTION_LIMIT, tls: bool = False,
                **extra: Any) -> DemoServer:
    """Bind ``host:port`` and return the server (not yet running); ``EdgeDemoError`` when the
    address cannot be used, with the reason and the fix. ``tls``: HTTPS will be enabled (an
    HTTPS connection holds three file descriptors: the client's and a socket pair)."""
    connection_limit = _fit_fd_limit(int(connection_limit), 3 if tls else 1)
    # waitress warns "Task queue depth is N" for every request that waits for a worker; with
    # one worker per core, waiting is how the load is spread, not a fault: one line per request
    # under load would bury the log
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        adj = Adjustments(
            host=host, port=port, threads=threads, ident="edge-demo",
            clear_untrusted_proxy_headers=True,
            max_request_body_size=int(max_body),
            recv_bytes=RECV_BYTES,
            # bodies up to the limit stay in memory: waitress spools larger ones to a file
            inbuf_overflow=int(max_body) + 1,
            outbuf_overflow=64 * 1024 * 1024,
            channel_timeout=int(max(1, idle_timeout)),
            cleanup_interval=1,
            connection_limit=connection_limit,
            asyncore_use_poll=True, **extra)
    except (ValueError, OSError) as exc:
        raise EdgeDemoError(
            f"Cannot listen on host {host!r} port {port}: {str(exc).rstrip('.')}. Pass --host"
            " with an address of this machine (127.0.0.1, or 0.0.0.0 for every interface)."
        ) from exc
    try:
        server = DemoServer(app, adj, request_timeout)
    except OSError as exc:
        raise EdgeDemoError(_bind_message(host, port, exc)) from exc
    return server


def _bind_message(host: str, port: int, exc: OSError) -> str:
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (f"Port {port} on {host} is already in use (another server is listening"
                " there). Stop it or pass another --port, e.g. --port 8081.")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"The address {host} does not belong to this machine, so the server cannot"
                " listen on it. Pass --host 127.0.0.1 (this machine only) or --host 0.0.0.0"
                " (every interface).")
    if exc.errno == errno.EACCES:
        return (f"No permission to listen on port {port} (ports below 1024 need root)."
                " Pass a port of 1024 or more, e.g. --port 8080.")
    return f"Cannot listen on {host}:{port} ({exc.strerror or exc}). Pass another --host/--port."


def _fit_fd_limit(connection_limit: int, fds_each: int = 1) -> int:
    """Raise the open-file soft limit to fit the connections (or shrink the limit to fit)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return connection_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connection_limit * fds_each + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        connection_limit = max(16, min(connection_limit, (soft - 64) // fds_each))
    return connection_limit


def urls(host: str, port: int) -> list[str]:
    """The URLs to open: 127.0.0.1 when reachable, plus this machine's LAN addresses for
    0.0.0.0 (or the host itself when it is a specific address)."""
    if host in ("0.0.0.0", "", "::"):
        hosts = ["127.0.0.1", *lan_addresses()]
    elif host in ("localhost",):
        hosts = ["127.0.0.1"]
    else:
        hosts = [host]
    return [f"http://{h}:{port}/" for h in dict.fromkeys(hosts)]


def lan_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (best effort, no network traffic)."""
    found: list[str] = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(info[4][0])
    except OSError:
        pass
    try:  # the address of the default route's interface (UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            found.append(s.getsockname()[0])
    except OSError:
        pass
    return [a for a in dict.fromkeys(found) if not a.startswith("127.")]
