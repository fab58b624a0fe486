"""The suite never reaches past 127.0.0.1 (conftest's ``network_only_on_loopback``): a
test that would download weights or talk to the real Hub fails instead of fetching."""

from __future__ import annotations

import socket

import pytest


@pytest.mark.parametrize("address", [("93.184.215.14", 80), ("download.pytorch.org", 443)])
def test_a_connection_beyond_loopback_is_refused_before_any_packet(address):
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError,
                                                match="only connect to 127.0.0.1"):
        sock.connect(address)


def test_a_local_server_is_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            accepted, _ = server.accept()
            accepted.close()
