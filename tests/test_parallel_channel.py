"""Control channel: both ends must prove the per-group secret before anything is unpickled."""

import pickle
import struct
import socket
import threading
from multiprocessing import AuthenticationError
from pathlib import Path

import pytest

from parallel.channel import ControlListener, connect, new_secret


class _Touch:
    """Unpickling this creates a file: proof that a payload was (or was not) decoded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def accept_in_thread(listener, results, timeout=5.0):
    t = threading.Thread(target=lambda: results.append(listener.accept(timeout=timeout)))
    t.start()
    return t


def test_wrong_secret_refused_then_right_secret_accepted():
    lis = ControlListener(handshake_timeout=2.0)
    assert lis.address[0] == "127.0.0.1"
    got = []
    t = accept_in_thread(lis, got)
    with pytest.raises(AuthenticationError):
        connect(lis.address, new_secret(), timeout=2.0)
    t.join()
    assert got == [None] and lis.rejected == 1
    t = accept_in_thread(lis, got)
    client = connect(lis.address, lis.secret, timeout=2.0)
    t.join()
    server = got[-1]
    client.send(("hello", 3, {"x": 1}))
    assert server.recv() == ("hello", 3, {"x": 1})
    server.send(("job", 1))
    assert client.recv() == ("job", 1)
    client.close(), server.close(), lis.close()


def test_unauthenticated_payload_is_never_unpickled(tmp_path):
    lis = ControlListener(handshake_timeout=2.0)
    got = []
    t = accept_in_thread(lis, got)
    payload = pickle.dumps(("job", _Touch(tmp_path / "pwned")))
    with socket.create_connection(lis.address) as raw:
        raw.sendall(struct.pack("!i", len(payload)) + payload)  # a framed message, no handshake
        t.join()
    assert got == [None] and lis.rejected == 1
    assert not (tmp_path / "pwned").exists()
    pickle.loads(payload)  # the payload does work when decoded: the check above is meaningful
    assert (tmp_path / "pwned").exists()
    lis.close()


def test_silent_peer_cannot_stall_accept():
    lis = ControlListener(handshake_timeout=0.5)
    got = []
    with socket.create_connection(lis.address):
        t = accept_in_thread(lis, got)
        t.join(timeout=5.0)
    assert not t.is_alive() and got == [None] and lis.rejected == 1
    lis.close()
