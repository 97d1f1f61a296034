"""A replica's socket (ReplicaServer, served in this process): whoever reaches its port without
the cluster's secret is dropped, a pickle is never run (the reproduction of issue 30: a
length-prefixed pickle whose __reduce__ has an effect, sent to a replica's port and accepted once
the front end went away), a silent connection cannot hold the replica's only accept slot, and
the replica serves a proper front end afterwards."""
from __future__ import annotations

import pickle
import socket
import struct

import pytest

from punctual.cluster.replica import ReplicaServer
from punctual.config import EngineConfig
from punctual.engine.client import EngineCoreClient
from punctual.engine.messages import SCHEMA, CoreUpdate, front_end_channel
from punctual.request import EngineCoreRequest
from punctual.sampling_params import SamplingParams
from punctual.wire.auth import MAGIC, authenticate_server, new_secret

CONFIG = EngineConfig.from_kwargs("builtin-tiny", dtype="float32", num_kv_blocks=64, block_size=4)
GREETING_BYTES = len(MAGIC) + 16 + 32


@pytest.fixture(scope="module")
def replica():
    secret = new_secret()
    server = ReplicaServer(CONFIG, 1, "127.0.0.1", secret)
    yield server, secret
    server.listener.close()


def generate(server: ReplicaServer, secret: bytes, request_id: str) -> list[int]:
    """A proper front end: connect with the secret, run one greedy request to the end."""
    client = EngineCoreClient(CONFIG)
    host, port, _ = server.address()
    info = client.connect(host, port, timeout=10.0, secret=secret)
    assert info.pid == server.address()[2]
    channel = front_end_channel(client.sock)
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        channel.send([("add", EngineCoreRequest(request_id, [5, 6, 7, 8, 9], params))])
        tokens: list[int] = []
        while True:
            message = channel.recv()
            assert isinstance(message, CoreUpdate)
            for output in message.outputs:
                tokens.extend(output.new_token_ids)
                if output.finished:
                    return tokens
    finally:
        client.sock.close()


def connect(server: ReplicaServer) -> socket.socket:
    host, port, _ = server.address()
    sock = socket.create_connection((host, port), timeout=10.0)
    sock.settimeout(10.0)  # a deadline for every read below: a replica that never hangs up fails the test
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the replica sends before it closes the connection."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def evil_frame(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling it would create the marker file

    body = pickle.dumps([("add", Payload())])
    return struct.pack("!Q", len(body)) + body


def test_a_pickle_sent_to_the_port_is_dropped_and_not_run(replica, tmp_path, caplog):
    server, secret = replica
    expected = generate(server, secret, "before")
    marker = tmp_path / "ran"
    sock = connect(server)
    sock.sendall(evil_frame(marker))
    received = read_until_closed(sock)
    sock.close()
    assert received.startswith(MAGIC) and len(received) == GREETING_BYTES  # a challenge, then nothing
    assert not marker.exists()
    assert "refused a connection" in caplog.text  # logged before the replica hung up
    assert generate(server, secret, "after") == expected


def test_a_pickle_queued_behind_the_front_end_is_dropped_when_it_leaves(replica, tmp_path):
    """The issue's reproduction: the attacker waits in the accept queue while a front end is
    connected, and reaches the replica when the front end goes away."""
    server, secret = replica
    marker = tmp_path / "ran"
    front_end = EngineCoreClient(CONFIG)
    host, port, _ = server.address()
    front_end.connect(host, port, timeout=10.0, secret=secret)
    attacker = connect(server)
    attacker.sendall(evil_frame(marker))
    front_end.sock.close()
    assert read_until_closed(attacker)[:len(MAGIC)] == MAGIC
    attacker.close()
    assert not marker.exists()
    assert generate(server, secret, "after-queue")


def test_a_peer_without_the_secret_is_dropped(replica):
    server, secret = replica
    sock = connect(server)
    with pytest.raises(Exception, match="did not prove|closed"):
        authenticate_server(sock, new_secret(), SCHEMA.fingerprint, timeout_s=10.0)
    sock.close()
    assert generate(server, secret, "after-wrong-secret")


def test_an_authenticated_peer_that_sends_a_pickle_is_dropped(replica, tmp_path, caplog):
    server, secret = replica
    marker = tmp_path / "ran"
    sock = connect(server)
    authenticate_server(sock, secret, SCHEMA.fingerprint, timeout_s=10.0)
    sock.sendall(evil_frame(marker))
    read_until_closed(sock)  # its CoreInfo, then the replica hangs up on the bad frame
    sock.close()
    assert not marker.exists()
    assert "malformed frame" in caplog.text
    assert generate(server, secret, "after-bad-frame")


def test_a_silent_connection_cannot_hold_the_replica(replica):
    server, secret = replica
    silent = connect(server)
    # The silent peer holds the only accept slot until its handshake time runs out; then the
    # proper front end behind it is served.
    assert generate(server, secret, "behind-silence")
    assert read_until_closed(silent)[:len(MAGIC)] == MAGIC  # greeted, then dropped
    silent.close()
