"""Who is calling: API keys, the tenant each key belongs to, and the cache salt a tenant gets.

A key file holds one `key tenant` pair a line (blank lines and `#` comments skipped); keys given
alone (`--api-key`, PUNCTUAL_API_KEY) are tenants `key-1`, `key-2`, ... in the order given.
Several keys may share a tenant (rotation): they share its prefix cache and its fair share.
Tenant names stay short and plain: they become Prometheus label values.
"""
from __future__ import annotations

import re
import secrets

ISOLATION_MODES = ("none", "api-key", "user")
TENANT_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")


def load_api_keys(keys: list[str] | None = None, key_file: str | None = None) -> dict[str, str]:
    """key -> tenant, from keys given alone and a key file; raises ValueError naming the problem."""
    tenants: dict[str, str] = {}

    def add(key: str, tenant: str, where: str) -> None:
        if not key:
            raise ValueError(f"{where}: an empty API key")
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"{where}: tenant {tenant!r} must be 1-64 of letters, digits and _.@:-")
        if tenants.get(key, tenant) != tenant:
            raise ValueError(f"{where}: the key is already given for tenant {tenants[key]!r}")
        tenants[key] = tenant

    for i, key in enumerate(keys or (), start=1):
        add(key.strip(), f"key-{i}", f"--api-key #{i}")
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    parts = line.split()
                    if len(parts) != 2:
                        raise ValueError(f"--api-key-file {key_file}, line {number}: expected `KEY TENANT`")
                    add(parts[0], parts[1], f"--api-key-file {key_file}, line {number}")
        except OSError as exc:
            raise ValueError(f"--api-key-file: cannot read {key_file}: {exc.strerror}") from None
    return tenants


def tenant_of(api_keys: dict[str, str], authorization: str) -> str | None:
    """The tenant of the key in an `Authorization: Bearer KEY` header; None if it names no key.
    Every key is compared in constant time, so the answer's timing does not tell how close a guess was."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    offered = key.strip().encode()
    found = None
    for known, tenant in api_keys.items():
        if secrets.compare_digest(offered, known.encode()):
            found = tenant
    return found


def isolation_salt(mode: str, tenant: str | None, user: str | None, client_salt: str | None) -> str | None:
    """The prefix-cache salt of a request: the tenant's or the user's when the server isolates by
    them (whatever the client sent), else the client's own `cache_salt`."""
    if mode == "api-key":
        return f"tenant:{tenant}"
    if mode == "user":
        return f"user:{user or ''}"  # requests without a user share with each other only
    return client_salt or None
