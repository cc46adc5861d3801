"""Who may talk to the daemon's HTTP listeners (viewer, metrics): Host/Origin names and the token.

- Loopback: a listener on 127.0.0.1, ::1 or `localhost` is reachable from this machine only;
  anything else (0.0.0.0, ::, a LAN address or name) is "beyond loopback" and needs a token.
- Host/Origin (DNS rebinding): a web page from another site can make a browser on this machine
  send requests to 127.0.0.1:8080 under the page's own host name (its DNS answer changed to
  127.0.0.1) and read the answers. Requests are therefore answered only when their `Host` (and,
  when sent, `Origin`) names this machine: localhost and loopback addresses, the address the
  client connected to, the bind host, and — beyond loopback — this machine's host names, plus
  the configured `allowed_hosts`. A rebinding page's host name is none of these.
- Token: sent as `Authorization: Bearer TOKEN`, as a cookie, or once as `?token=TOKEN` (which
  sets the cookie, so a browser can open the page from a link). Compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from urllib.parse import urlsplit

from pn2v_live.errors import UserError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ASCII_PORT = re.compile(r"[0-9]{1,5}")
TOKEN_MIN_LENGTH = 16
TOKEN_ADVICE = "e.g. the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def split_host_port(bind: str) -> tuple[str, int] | None:
    """'host:port' (IPv6 as '[::1]:8080') → (host, port) with an ASCII-decimal port in 0..65535,
    or None when `bind` is not of that form."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not ASCII_PORT.fullmatch(port) or int(port) > 65535:
        return None
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_bind(bind: str, setting: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:8080') → (host, port); a UserError naming `setting` (e.g.
    "metrics.bind") when `bind` is not of that form (`split_host_port`)."""
    parsed = split_host_port(bind)
    if parsed is None:
        raise UserError(f"{setting} {bind!r} is not host:port, e.g. 127.0.0.1:8080")
    return parsed


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """True when a listener on `host` is reachable from this machine only.

    `localhost` and loopback addresses are; wildcards (0.0.0.0, ::) and other addresses are not;
    another name is loopback only when every address it resolves to is."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    address = _literal(host)
    if address is not None:
        return address.is_loopback
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False  # binding it will fail anyway; never call an unknown name loopback
    return bool(infos) and all(_literal(info[4][0].split("%")[0]).is_loopback for info in infos)


def normalise_host(name: str) -> str:
    """Lower case, no IPv6 brackets, no trailing dot: how names are compared."""
    return name.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def host_of_header(value: str) -> str | None:
    """The host name of a `Host` header value ('name', 'name:port', '[v6]:port'), normalised,
    or None when it is not of that form."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and ASCII_PORT.fullmatch(rest[1:]))):
            return None
        return normalise_host(value[1:end]) or None
    host, sep, port = value.rpartition(":")
    if not sep:
        host = value
    elif not ASCII_PORT.fullmatch(port):
        return None
    host = normalise_host(host)
    if not host or not re.fullmatch(r"[a-z0-9._-]+", host, re.ASCII):
        return None
    return host


def allowed_hosts(bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The names a listener bound to `bind_host` answers to (besides the address a client
    connected to, which `HostCheck` adds per request)."""
    names = set(LOOPBACK_NAMES)
    bind_host = normalise_host(bind_host)
    address = _literal(bind_host)
    if address is None or not address.is_unspecified:
        names.add(bind_host)
    if not is_loopback(bind_host):
        names.add(socket.gethostname())
        names.add(socket.getfqdn())
    names.update(extra)
    return frozenset(normalise_host(name) for name in names if name)


class HostCheck:
    """Decides whether a request's Host and Origin name this listener (see the module doc)."""

    def __init__(self, bind_host: str, extra: list[str] | tuple[str, ...] = ()) -> None:
        self.names = allowed_hosts(bind_host, extra)

    def _known(self, host: str | None, local_address: str | None) -> bool:
        if host is None:
            return False
        if host in self.names:
            return True
        address = _literal(host)
        if address is None:
            return False
        if address.is_loopback:
            return True
        local = _literal(normalise_host(local_address or "").split("%")[0])
        if local is None:
            return False
        mapped = getattr(local, "ipv4_mapped", None)  # a dual-stack socket's view of IPv4
        return address == local or (mapped is not None and address == mapped)

    def refusal(
        self, host_header: str | None, origin: str | None, local_address: str | None
    ) -> tuple[int, str] | None:
        """None when the request may be answered, else (HTTP status, reason)."""
        if host_header is None:
            return 400, "the request has no Host header"
        if not self._known(host_of_header(host_header), local_address):
            return 421, (
                f"Host {host_header[:100]!r} is not a name of this server; add it to "
                "allowed_hosts if it is (this protects against DNS rebinding)"
            )
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            host = normalise_host(parts.hostname or "") if parts and parts.scheme else None
            if not self._known(host, local_address):
                return 403, f"requests from pages of Origin {origin[:100]!r} are not answered"
        return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def token_matches(offered: str | None, token: str) -> bool:
    """Constant-time comparison of an offered token with the configured one."""
    if offered is None:
        return False
    return hmac.compare_digest(offered.encode("utf-8", "replace"), token.encode())


def exposure_warning(listener: str, bind: str, token_key: str) -> str:
    """The start-up WARNING for a listener bound beyond loopback."""
    return (
        f"{listener} listens beyond loopback on {bind}: every machine that can reach this port "
        f"can connect. Requests without {token_key} (header 'Authorization: Bearer TOKEN', "
        "cookie, or ?token= once) get 401, but plain HTTP carries the token and the data "
        "unencrypted: on an untrusted network bind to 127.0.0.1 and put a TLS reverse proxy "
        "in front"
    )
