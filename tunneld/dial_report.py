"""What a client says about its dials to one server: "cannot reach" vs "lost", in words, once.

Pure (no reactor, no grpc): ``DialHistory`` is fed by the dial service
(``dialing``, ``accepted``, ``failed(reason)``) and answers what to log:

* a stream that had been accepted and ends is **lost** (one info line);
* a dial that never got a stream accepted **cannot reach** the server: the
  first failures are info lines; at the ``WARN_AFTER``-th failure in a row,
  one warning with the address, the last error in words and the likely
  cause; then the retries are quiet (debug) until a stream is accepted.

``explain(reason, tls)`` turns grpc's error text into (words, likely cause):
nothing listens there; that port speaks HTTP/1.1, not the tunnel; TLS
expected or not; a certificate not trusted; the wrong token; a host name
that does not resolve; no answer at all.  ``summary()`` is the same in
words for ``/status``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: This many failed dials in a row make one warning; later ones are quiet.
WARN_AFTER = 3


def explain(reason: str, tls: bool) -> tuple[str, str]:
    """``(error in words, likely cause)`` for a failed dial's ``reason`` (grpc's text); cause "" when unknown."""
    text = reason.lower()
    if "another tunnel protocol version" in text:
        return (reason, "run the same tunneld version on both ends")
    if "unauthenticated" in text or "invalid token" in text:
        return ("the server refused the token",
                "wrong token (or group): `token` must be one of the tokens of the client's `group` in the "
                "server's config")
    if "connection refused" in text:
        return ("connection refused",
                "nothing listens there: is the server running, and is `server` its tunnel_listen address?")
    if "failed parsing http/2" in text or "expected settings frame" in text or "http1.x" in text:
        return ("the port answered, but not with HTTP/2",
                "that port speaks HTTP/1.1, not the tunnel: `server` must name the server's tunnel_listen, "
                "not its http_listen or admin_listen")
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return ("the server's certificate was not trusted",
                "check tls_ca (the CA that signed the server's certificate) and tls_server_name in [client]")
    if tls and ("wrong_version_number" in text or "handshake failed" in text or "ssl" in text):
        return ("the TLS handshake failed",
                "TLS expected, but that port speaks plain text: the server's tunnel port has no tls_cert "
                "(drop tls, tls_ca and tls_cert from [client], or give the server tls_cert and tls_key)")
    if not tls and ("connection reset" in text or "socket closed" in text or "connection closed" in text):
        return ("the server closed the connection during the handshake",
                "that port may expect TLS (set tls = true and tls_ca in [client]), or it is not a tunneld "
                "tunnel port")
    if "resolv" in text or "domain name not found" in text or "name or service not known" in text:
        return ("the host name does not resolve", "check the host name in `server`")
    if "deadline" in text or "timed out" in text or "timeout" in text:
        return ("no answer in time",
                "a firewall may drop the packets, or the address is not the server's")
    if "resource_exhausted" in text:
        return ("the server is throttling tunnel opens from this address",
                "too many opens (or refused opens) from here; the server lets it in once its window passes")
    words = reason.split("last error: ", 1)[-1] if "last error: " in reason else reason
    return (words, "")


@dataclass(frozen=True)
class Report:
    """What to log for one ended dial: ``kind`` is "lost", "cannot_reach", "warn" or "quiet"."""

    kind: str
    failures: int     # failed dials in a row (0 for "lost")
    words: str        # the error in words
    cause: str        # the likely cause ("" when unknown)


class DialHistory:
    """The dials to one server: consecutive failures, whether it was ever up, the last error."""

    def __init__(self, target: str, tls: bool) -> None:
        self.target = target
        self.tls = tls
        self.ever_connected = False
        self.up = False            # the current dial's stream was accepted
        self.failures = 0          # failed dials in a row
        self.last_error = ""       # words
        self.likely_cause = ""

    def dialing(self) -> None:
        self.up = False

    def accepted(self) -> None:
        self.up = True
        self.ever_connected = True
        self.failures = 0
        self.last_error = self.likely_cause = ""

    def failed(self, reason: str) -> Report:
        """The current dial ended with ``reason``: what to log about it."""
        if self.up:
            # A stream that was up: its reason as it came (the handshake guesses do not apply).
            self.up = False
            self.last_error, self.likely_cause = reason, ""
            return Report("lost", 0, reason, "")
        words, cause = explain(reason, self.tls)
        self.failures += 1
        self.last_error, self.likely_cause = words, cause
        if self.failures < WARN_AFTER:
            return Report("cannot_reach", self.failures, words, cause)
        if self.failures == WARN_AFTER:
            return Report("warn", self.failures, words, cause)
        return Report("quiet", self.failures, words, cause)

    def summary(self) -> str:
        """One sentence for /status."""
        if self.up:
            return f"connected to {self.target}"
        if self.failures == 0:
            if self.last_error:
                return f"lost the tunnel to {self.target} ({self.last_error}); reconnecting"
            return f"dialling {self.target}"
        what = "cannot reach" if not self.ever_connected else "lost the tunnel and cannot reach"
        text = (f"{what} {self.target}: {self.failures} failed dial{'s' if self.failures != 1 else ''} in a row; "
                f"last error: {self.last_error}")
        return text + (f"; likely cause: {self.likely_cause}" if self.likely_cause else "")
