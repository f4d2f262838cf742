"""The local stack keeps its default ports across `stack down` and `stack up`."""

from __future__ import annotations

import socket

from streamagg.stack import _port_is_free, free_port


def test_a_port_is_taken_while_listened_on_and_free_again_with_only_closed_connections_left() -> None:
    port = free_port()
    server = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR, as PostgreSQL and Kafka bind
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert not _port_is_free(port)
    accepted.close()  # the server side closes first: its end of the connection waits in TIME_WAIT
    client.close()
    server.close()
    assert _port_is_free(port)
