"""Control channel between the controlling process (ComfyUI / CLI) and its workers.

One duplex connection per worker, over TCP, loopback only by default. Both ends prove they know
a per-group random secret (HMAC challenge-response of `multiprocessing.connection`, in both
directions) before a single message is unpickled: a peer without the secret is dropped during the
handshake and nothing it sends is ever decoded. A peer that connects and stays silent is dropped
after `handshake_timeout` seconds, so it cannot stall the accept loop.

Messages are tuples `(kind, *fields)` pickled with the standard pickler (not the multiprocessing
one, so CPU tensors travel as bytes rather than as shared-memory handles). Sends are thread-safe.
"""

from __future__ import annotations

import logging
import pickle
import secrets
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from typing import Any

log = logging.getLogger(__name__)

SECRET_BYTES = 32


class ChannelClosed(EOFError):
    """The other end closed the connection (or its process died)."""


def new_secret() -> bytes:
    """A fresh per-group secret (32 random bytes)."""
    return secrets.token_bytes(SECRET_BYTES)


class Channel:
    """An authenticated message connection. `send` may be called from several threads."""

    def __init__(self, conn: Connection, peer: str = "") -> None:
        self.conn = conn
        self.peer = peer
        self._send_lock = threading.Lock()

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            raise ChannelClosed(f"control channel to {self.peer or 'peer'} is closed ({exc})") from exc

    def recv(self) -> Any:
        try:
            data = self.conn.recv_bytes()
        except (EOFError, OSError, ValueError) as exc:
            raise ChannelClosed(f"control channel to {self.peer or 'peer'} closed") from exc
        return pickle.loads(data)

    def poll(self, timeout: float = 0.0) -> bool:
        try:
            return self.conn.poll(timeout)
        except (EOFError, OSError, ValueError):
            return True  # the next recv reports the closed channel

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def _set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Kernel-level send/recv timeouts (they also apply after the fd is wrapped in a Connection)."""
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    val = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, val)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, val)


class ControlListener:
    """Listening end. `host` is loopback unless a multi-host (torchrun) group needs otherwise."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: bytes | None = None,
                 handshake_timeout: float = 10.0) -> None:
        self.secret = secret if secret is not None else new_secret()
        if len(self.secret) < 16:
            raise ValueError("the control-channel secret must be at least 16 bytes")
        self.handshake_timeout = handshake_timeout
        self._sock = socket.create_server((host, port), backlog=64)
        self.rejected = 0  # handshakes that failed (wrong secret, silence, garbage)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def accept(self, timeout: float | None = None) -> Channel | None:
        """Wait up to `timeout` s for one peer; return its channel once it proved the secret.

        Returns None on timeout or when the peer failed the handshake (logged, counted in
        `rejected`); callers loop.
        """
        self._sock.settimeout(timeout)
        try:
            raw, addr = self._sock.accept()
        except (socket.timeout, BlockingIOError):
            return None
        raw.settimeout(None)
        _set_io_timeout(raw, self.handshake_timeout)
        conn = Connection(raw.detach())
        peer = f"{addr[0]}:{addr[1]}"
        try:
            deliver_challenge(conn, self.secret)
            answer_challenge(conn, self.secret)
        except (AuthenticationError, EOFError, OSError) as exc:
            self.rejected += 1
            log.warning("control channel: refused %s (handshake failed: %s)", peer,
                        type(exc).__name__)
            conn.close()
            return None
        sock = socket.socket(fileno=conn.fileno())
        try:
            _set_io_timeout(sock, 0.0)  # back to blocking without limit
        finally:
            sock.detach()
        return Channel(conn, peer)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass


def connect(address: tuple[str, int], secret: bytes, timeout: float = 30.0) -> Channel:
    """Connect to a ControlListener, retrying while it is not up yet (up to `timeout` s).

    Raises `multiprocessing.AuthenticationError` if the listener does not hold the same secret.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Client(tuple(address), authkey=secret)
            return Channel(conn, f"{address[0]}:{address[1]}")
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


__all__ = ["ChannelClosed", "Channel", "ControlListener", "connect", "new_secret", "SECRET_BYTES"]
