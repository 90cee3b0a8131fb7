"""Optional API keys: with ``RESNET_API_KEYS`` set, inference, model metadata and admin routes need
``Authorization: Bearer <key>``. Health and metrics stay open for the orchestrator and the scraper."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import AdminDisabled, Unauthorized


async def require_api_key(request: Request) -> None:
    # async, though it awaits nothing: FastAPI runs a plain def dependency in its thread pool, a hop
    # that costs more than the check.
    keys = request.app.state.service.settings.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode()
    # Compare against every key with a constant-time comparison and no early exit, so response time
    # says nothing about how much of a key was right, nor which key matched.
    match = False
    for key in keys:
        match |= hmac.compare_digest(presented, key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not match:
        raise Unauthorized()


async def require_admin(request: Request) -> None:
    """Admin routes exist only when keys do: an open reload endpoint would let anyone stall the server."""
    if not request.app.state.service.settings.api_keys:
        raise AdminDisabled()
    await require_api_key(request)


Authorized = Annotated[None, Depends(require_api_key)]
Admin = Annotated[None, Depends(require_admin)]
