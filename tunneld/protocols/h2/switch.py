"""HTTP/1.1 or HTTP/2 on one port: ALPN on TLS, the 24-byte client preface on a plain port.

``EntrySwitchFactory`` listens in place of the HTTP entry's ``EntrySite``.
Each connection starts as a ``ProtocolSwitch``, which decides once and then
steps out of the way: the chosen protocol is installed on the transport
(``protocol`` of a TCP transport, ``wrappedProtocol`` of a TLS or PROXY
wrapper, as autobahn's WebSocket takeover does), connected, and handed the
bytes read so far.  From then on the switch costs nothing per read.

The decision: TLS that negotiated ALPN ``h2`` is HTTP/2 and ``http/1.1`` is
HTTP/1.1; otherwise (plain port, or TLS without ALPN) a connection whose
first 24 bytes are the HTTP/2 preface is HTTP/2 (h2c prior knowledge) and
anything else HTTP/1.1.  While what came so far is a proper prefix of the
preface, the switch waits for more; a connection that stays undecided longer
than the site's ``header_timeout`` is closed.

Counting: the site's own ``buildProtocol`` runs at connect, so
``max_connections`` (and any other admission rule of the site) covers both
protocols.  A refused connection gets the site's answer at once.  An
HTTP/2 connection keeps the unused HTTP/1.1 channel as its place in the
site's count and releases it when it ends.  Nothing here imports ngh2.
"""

from __future__ import annotations

from typing import Any, Final, Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.policies import ProtocolWrapper

from tunneld.protocols.headers import address_ip

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def sniff(data: bytes) -> bool | None:
    """True: ``data`` starts with the HTTP/2 preface; False: it cannot; None: a proper prefix so far."""
    if len(data) >= len(PREFACE):
        return data[:len(PREFACE)] == PREFACE
    return None if PREFACE.startswith(data) else False


class H2Side(TypingProtocol):
    """What the switch needs of the HTTP/2 side."""

    def build(self, addr: Any, place: Any, since: float) -> Protocol:
        """An HTTP/2 server connection; ``place`` (the unused HTTP/1.1 channel) is released when it ends;
        ``since``: when the connection came (its header_timeout counts from then)."""

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class ProtocolSwitch(Protocol):
    """One connection until it has said which protocol it speaks."""

    def __init__(self, factory: EntrySwitchFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.buffer = b""
        self.chosen: Any = None
        self.http1: Any = None
        self.timer: IDelayedCall | None = None
        self.started = 0.0

    def connectionMade(self) -> None:
        site = self.factory.site
        self.started = site.clock.seconds()
        self.http1 = site.buildProtocol(self.addr)
        channel = getattr(self.http1, "_channel", None)
        if channel is None or not getattr(channel, "counted", False):
            # Refused by the site (max_connections ...): its answer goes out now, whatever was offered.
            self._hand_over(self.http1)
            return
        if not site.proxy_protocol:
            # The address is known now: an undecided connection counts against max_connections_per_ip
            # too (else one address could hold any number by never sending a byte).
            ip = address_ip(self.transport.getPeer())
            if site.per_ip.limit and site.per_ip.held(ip) >= site.per_ip.limit:
                self._hand_over(self.http1)   # the channel answers 503, closes and counts the refusal
                return
            if site.per_ip.acquire(ip):
                channel.ip_slot = ip          # released with the channel (undecided, HTTP/1.1 or HTTP/2)
        if site.header_timeout > 0:
            self.timer = site.clock.callLater(site.header_timeout, self._undecided)

    def dataReceived(self, data: bytes) -> None:
        if self.chosen is not None:
            self.chosen.dataReceived(data)   # a transport we could not re-point (tests): forward
            return
        self.buffer += data
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated == b"h2":
            h2: bool | None = True
        elif negotiated is not None:
            h2 = False
        else:
            h2 = sniff(self.buffer)
            if h2 is None:
                return   # "PRI * HT...": wait for the rest of the preface
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if h2:
            channel = self.http1._channel
            self.http1 = None
            self._hand_over(self.factory.h2.build(self.addr, channel, self.started))
        else:
            protocol, self.http1 = self.http1, None
            self._hand_over(protocol)
            # Its header_timeout counts from the connect, not from the decision.
            protocol._channel.head_since = self.started

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.chosen is not None:
            self.chosen.connectionLost(reason)
            return
        if self.http1 is not None:
            # Undecided: the channel built at connect never ran; it only held our place in the count.
            release = getattr(self.http1._channel, "release", None)
            self.http1 = None
            if release is not None:
                release()

    def _undecided(self) -> None:
        self.timer = None
        site = self.factory.site
        site.header_timeouts = getattr(site, "header_timeouts", 0) + 1
        if self.transport is not None:
            self.transport.abortConnection()

    def _hand_over(self, protocol: Any) -> None:
        transport = self.transport
        assert transport is not None
        self.chosen = protocol
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol       # TLS, PROXY header
        elif getattr(transport, "protocol", None) is self:
            transport.protocol = protocol              # TCP
        protocol.makeConnection(transport)
        data, self.buffer = self.buffer, b""
        if data:
            protocol.dataReceived(data)


class EntrySwitchFactory(ServerFactory):
    """Listens for the HTTP entry: each connection goes to ``site`` (HTTP/1.1, WebSocket) or ``h2``."""

    def __init__(self, site: Any, h2: H2Side) -> None:
        self.site = site
        self.h2 = h2

    def buildProtocol(self, addr: Any) -> ProtocolSwitch:
        return ProtocolSwitch(self, addr)

    def startFactory(self) -> None:
        self.site.doStart()
        self.h2.doStart()

    def stopFactory(self) -> None:
        self.h2.doStop()
        self.site.doStop()
