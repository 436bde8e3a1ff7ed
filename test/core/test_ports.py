"""free_port_base: a free loopback range that outgoing connections cannot take between choosing and binding."""

from __future__ import annotations

import socket

from flad_core.procs import _ephemeral_range, free_port_base


def test_ranges_are_free_and_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    for _ in range(20):
        base = free_port_base(24)
        assert base + 24 <= low            # outgoing connections get their local ports from [low, high]
        socks = [socket.socket() for _ in range(24)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
        finally:
            for s in socks:
                s.close()
