"""Mutual HMAC challenge-response over a fresh connection, before any frame is read.

Both ends hold a per-cluster secret (generated at start-up, handed to the core through its
process arguments or Ray's actor arguments, never a command line or an environment). The server
speaks first with fixed-size messages, so nothing of variable length is read from a peer that
has not proved itself:

    server -> client   MAGIC | schema fingerprint (16) | server nonce (32)
    client -> server   client nonce (32) | HMAC(secret, "client" | fingerprints | nonces)
    server -> client   HMAC(secret, "server" | fingerprints | nonces)

The client proves it knows the secret before the server reads a frame; the server proves it
before the client trusts what it says (a process that took a dead replica's port cannot pose as
it). The fingerprint names the message schema, so two builds that would misread each other fail
here with a clear error instead of a garbled frame. A server gives a peer HANDSHAKE_TIMEOUT_S for
the whole exchange: a silent connection cannot hold a replica's only accept slot.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time

from punctual.wire.codec import WireError

MAGIC = b"PUNCTW1\0"
SECRET_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
FINGERPRINT_BYTES = 16
HANDSHAKE_TIMEOUT_S = 1.0


class AuthError(WireError):
    """The peer did not prove it knows the cluster's secret (or speaks another protocol)."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _mac(secret: bytes, role: bytes, fingerprint: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, role + MAGIC + fingerprint + server_nonce + client_nonce, hashlib.sha256).digest()


def authenticate_client(sock: socket.socket, secret: bytes, fingerprint: bytes,
                        timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Server side: challenge the peer that just connected; raises AuthError unless it answers
    with the secret's HMAC within `timeout_s` (the connection is then the caller's to close)."""
    deadline = time.monotonic() + timeout_s
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(sock, MAGIC + fingerprint + server_nonce, deadline)
    answer = _recv_exactly(sock, NONCE_BYTES + MAC_BYTES, deadline, "the peer's answer")
    client_nonce, mac = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, b"client", fingerprint, server_nonce, client_nonce)):
        raise AuthError("the peer did not prove it knows the cluster secret (or runs another Punctual build)")
    _send(sock, _mac(secret, b"server", fingerprint, server_nonce, client_nonce), deadline)


def authenticate_server(sock: socket.socket, secret: bytes, fingerprint: bytes, timeout_s: float) -> None:
    """Client side: answer the server's challenge and check its proof; raises AuthError."""
    deadline = time.monotonic() + timeout_s
    hello = _recv_exactly(sock, len(MAGIC) + FINGERPRINT_BYTES + NONCE_BYTES, deadline, "the server's greeting")
    if hello[:len(MAGIC)] != MAGIC:
        raise AuthError("the server does not speak Punctual's wire protocol")
    theirs, server_nonce = hello[len(MAGIC):len(MAGIC) + FINGERPRINT_BYTES], hello[len(MAGIC) + FINGERPRINT_BYTES:]
    if theirs != fingerprint:
        raise AuthError("the server runs a Punctual build whose messages differ from this one's "
                        f"(schema {theirs.hex()}, here {fingerprint.hex()})")
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(sock, client_nonce + _mac(secret, b"client", fingerprint, server_nonce, client_nonce), deadline)
    proof = _recv_exactly(sock, MAC_BYTES, deadline, "the server's proof")
    if not hmac.compare_digest(proof, _mac(secret, b"server", fingerprint, server_nonce, client_nonce)):
        raise AuthError("the server did not prove it knows the cluster secret")


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
    try:
        sock.sendall(data)
    except TimeoutError:
        raise AuthError("the handshake timed out") from None
    finally:
        sock.settimeout(None)


def _recv_exactly(sock: socket.socket, size: int, deadline: float, what: str) -> bytes:
    buffer = bytearray()
    try:
        while len(buffer) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(size - len(buffer))
            if not chunk:
                raise AuthError(f"the connection closed before {what}")
            buffer += chunk
    except TimeoutError:
        raise AuthError(f"no {what.removeprefix('the ')} within the handshake's time") from None
    finally:
        sock.settimeout(None)
    return bytes(buffer)
