"""The HTTP protocol ``vla-foundry serve`` runs under uvicorn: httptools', reading whole robot requests.

uvicorn stops reading a request body once 64 KiB of it wait for the app
(``uvicorn.protocols.http.flow_control.HIGH_WATER_LIMIT``) and reads on only after the
app has taken them. A robot's request with three raw 224×224 frames is 441 KiB, so it
arrived in stop-and-go rounds, each also stalling the robot, whose socket buffer had
filled. On a 2-core host over loopback, a bare uvicorn app round-tripped a 450 KiB
body in 1.2–1.4 ms (1 KiB: 0.3 ms); reading up to the limit below, in 0.65–0.75 ms.
The middleware reads every body whole anyway (``BodyCodecMiddleware``, capped by
``VLA_MAX_BODY_BYTES``), so buffering it here holds no more memory than the request
already needs.
"""

from __future__ import annotations

from typing import Union

# Unread body bytes a connection buffers before it stops reading: a few camera frames' worth.
BODY_BUFFER_BYTES = 4 * 1024 * 1024

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn serves with h11
    HttpToolsProtocol = None

if HttpToolsProtocol is not None:

    class WholeBodyHttpToolsProtocol(HttpToolsProtocol):
        """``HttpToolsProtocol`` whose read-ahead for a request body is ``BODY_BUFFER_BYTES``. ``on_body`` is
        uvicorn's (unchanged from 0.29 to 0.54, the versions the serve extra allows) but for the limit."""

        def on_body(self, body: bytes) -> None:
            if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
                return
            self.cycle.body += body
            if len(self.cycle.body) > BODY_BUFFER_BYTES:
                self.flow.pause_reading()
            self.cycle.message_event.set()


def http_protocol() -> Union[type, str]:
    """uvicorn's ``http=`` argument: the protocol above where httptools is installed, else uvicorn's choice."""
    return WholeBodyHttpToolsProtocol if HttpToolsProtocol is not None else "auto"
