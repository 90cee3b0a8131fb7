"""The HTTP server's part of the limits, of admission and of balance: uvicorn's httptools protocol with the request
head (request line and headers) capped, answered 431 (RFC 6585 section 5), requests that admission refuses at
once answered as soon as their head is in, and, under the supervisor, a worker over its share of the connections
closing one (``service.balance``), and a response's head written with its body. httptools itself buffers a head
of any size, and the body, time and pixel limits only start once the head is in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.balance import ConnectionShares

# (method, request target, headers as uvicorn keeps them, client) -> the whole response to write, closing the
# connection, or None to serve the request
Refuse = Callable[[bytes, bytes, list[tuple[bytes, bytes]], tuple[str, int] | None], bytes | None]


class HeadTooLarge(Exception):
    pass


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # what a cycle writes before the head, for a client that waits for it


class OneWrite:
    """The connection as one request's cycle writes to it. uvicorn writes a response's head, then its body: two
    syscalls and two segments for a small answer. Here the head waits for the body's first write, and both leave in
    one; a head with no body to follow yet (HEAD, a stream that starts later) leaves at the end of the loop's turn.
    (docs/throughput.md#the-head-with-the-body-2026-12-05)"""

    __slots__ = ("transport", "loop", "held", "head_seen")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop, self.held, self.head_seen = transport, loop, None, False

    def write(self, data: bytes) -> None:
        if not self.head_seen and data != CONTINUE:  # a cycle's first write, but for 100 Continue, is the head
            self.head_seen, self.held = True, data
            self.loop.call_soon(self.flush)
        elif self.held is not None:
            held, self.held = self.held, None
            self.transport.writelines((held, data))
        else:
            self.transport.write(data)

    def flush(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class CappedHead(HttpToolsProtocol):
    """Counts what arrives until a request's headers are complete; past ``max_head_bytes``, 431 and close.

    Two counts, because a chunk may end the head and start the body: whole chunks while the head is still
    open after them, and the parsed URL and header bytes, which cover the chunk that ends it.
    """

    max_head_bytes = 16 * 1024
    refuse: Refuse | None = None
    shares: ConnectionShares | None = None  # one worker of several: its share of the connections

    def connection_made(self, transport) -> None:  # noqa: ANN001 - asyncio's Transport
        super().connection_made(transport)
        self.head_open, self.head_fed, self.head_parsed, self.head_too_large = True, 0, 0, False
        self.refused = False  # the request being read was answered already: its body is read and dropped
        self.leaving = False  # told to close after the response being made
        if self.shares is not None:
            self.shares.publish(len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.shares is not None:
            if self.leaving:
                self.shares.leaving -= 1
            self.shares.publish(len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self.head_open:
            self.head_fed += len(data)
        super().data_received(data)
        if self.head_open and self.head_fed > self.max_head_bytes and not self.head_too_large:
            self.head_too_large = True
            self.send_400_response("")

    def count(self, n: int) -> None:
        self.head_parsed += n
        if self.head_parsed > self.max_head_bytes:
            self.head_too_large = True
            raise HeadTooLarge  # httptools turns it into a parser error, which uvicorn answers below

    def on_url(self, url: bytes) -> None:
        self.count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.head_open = False
        if self.refuse is not None and self.refused_at_once():
            return
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is cycle:  # no request cycle began: a connection upgrade, which uvicorn hands elsewhere
            return
        self.cycle.transport = OneWrite(self.transport, self.loop)
        if self.shares is not None and self.cycle.keep_alive and not self.leaving:
            self.leave_if_over_share()

    def leave_if_over_share(self) -> None:
        """One connection at a time leaves a worker over its share: the count of those leaving is subtracted at
        once, so the requests that follow on other connections do not all close theirs too."""
        if self.shares.over_share():
            self.cycle.keep_alive = False  # uvicorn answers with connection: close, then closes (its drain's way)
            self.leaving = True
            self.shares.leaving += 1
            self.shares.publish(len(self.connections))

    def refused_at_once(self) -> bool:
        """Under overload most requests are refused: answered here, one costs no request task, ASGI call chain or
        body read. Not while an earlier request on the connection is unanswered (answers keep their order), nor
        for a client waiting for 100-continue before it sends the body the close waits for."""
        if self.expect_100_continue or (self.cycle is not None and not self.cycle.response_complete):
            return False
        answer = self.refuse(self.parser.get_method(), self.url, self.headers, self.client)
        if answer is None:
            return False
        # Written now, the connection is closed once the body has been read (and dropped): closing with unread bytes
        # would reset it, and the client could lose the answer. Closed, not kept alive: a client that retries at
        # once comes back on a new connection, which the kernel may hand to a less busy worker.
        self.transport.write(answer)
        self.refused = True
        # A client that has its answer gets no longer for the rest of its body than an idle kept-alive connection.
        self.refused_timer = self.loop.call_later(self.timeout_keep_alive, self.transport.close)
        return True

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused:
            self.refused = False
            self.refused_timer.cancel()
            self.transport.close()
        else:
            super().on_message_complete()
        self.head_open, self.head_fed, self.head_parsed = True, 0, 0

    def send_400_response(self, msg: str) -> None:
        if not self.head_too_large:
            super().send_400_response(msg)
            return
        body = json.dumps({"detail": f"request line and headers too large: limit {self.max_head_bytes} bytes "
                                     "(RESNET_MAX_HEADER_BYTES)"}, separators=(",", ":")).encode()
        self.logger.warning("431: request head over %d bytes from %s", self.max_head_bytes, self.client)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def capped_head(max_head_bytes: int, refuse: Refuse | None = None,
                shares: ConnectionShares | None = None) -> type[CappedHead]:
    """The protocol class uvicorn instantiates per connection, with the configured limit, admission check and, for
    a supervised worker, its share of the connections."""
    return type("CappedHead", (CappedHead,), {"max_head_bytes": max_head_bytes, "refuse": staticmethod(refuse),
                                              "shares": shares})
