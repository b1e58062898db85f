"""The test and bench harness's ports: below the OS's ephemeral range, so no outgoing connection made between
the pick and the server's bind can hold one (a server once failed to bind its gRPC port that way)."""

from __future__ import annotations

import socket

from harness.server import ephemeral_range, free_port


def test_free_ports_are_below_the_ephemeral_range_and_can_be_bound():
    low, high = ephemeral_range()
    assert 1024 < low < high
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), ports
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # raises if it was not free
