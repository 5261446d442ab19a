"""The test helpers' own faults: ports handed to servers and Ray nodes."""
from __future__ import annotations

import pytest

from tests import services


class _Socket:
    """bind(0) answers from a script, as a kernel that reuses a just-closed port would."""
    script: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self, addr):
        self.port = _Socket.script.pop(0)

    def getsockname(self):
        return ("127.0.0.1", self.port)


def test_free_port_never_hands_out_one_port_twice(monkeypatch):
    monkeypatch.setattr(services, "_GIVEN", set())
    monkeypatch.setattr(services.socket, "socket", _Socket)
    _Socket.script = [40001, 40001, 40001, 40002]
    assert [services.free_port(), services.free_port()] == [40001, 40002]
    assert _Socket.script == []


def test_free_port_says_when_the_kernel_only_repeats(monkeypatch):
    monkeypatch.setattr(services, "_GIVEN", {40001})
    monkeypatch.setattr(services.socket, "socket", _Socket)
    _Socket.script = [40001] * 100
    with pytest.raises(RuntimeError, match="no fresh port in 100 tries"):
        services.free_port()


def test_free_port_gives_distinct_ports_that_can_be_bound():
    import socket
    ports = [services.free_port() for _ in range(20)]
    assert len(set(ports)) == 20
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
