"""Optional API keys: with ``RESNET_API_KEYS`` set, inference, model metadata and admin need
``Authorization: Bearer <key>``; health and metrics stay open for the orchestrator and the scraper.
Protocol-neutral: a door passes the header value it received."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from service.errors import AdminDisabled, Unauthorized


def check_key(keys: list[SecretStr], authorization: str | None) -> None:
    """``Unauthorized`` unless ``authorization`` is ``Bearer <one of keys>`` (no keys: everything passes)."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    presented = token.strip().encode()
    # Compare against every key with a constant-time comparison and no early exit, so response time
    # says nothing about how much of a key was right, nor which key matched.
    match = False
    for key in keys:
        match |= hmac.compare_digest(presented, key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not match:
        raise Unauthorized()


def check_admin(keys: list[SecretStr], authorization: str | None) -> None:
    """Admin exists only when keys do: an open reload endpoint would let anyone stall the server."""
    if not keys:
        raise AdminDisabled()
    check_key(keys, authorization)
