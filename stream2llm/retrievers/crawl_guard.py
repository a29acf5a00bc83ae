"""The crawler's SSRF guard: which URLs a crawl may fetch, and which addresses it may connect to.

Follows the OWASP SSRF guidance: only http(s) URLs, judged before any cache; every host resolved once
per crawl and its checked addresses pinned, so the downloader (scrapy's aiohttp handler, through
``PinnedResolver``) connects to exactly the addresses that were checked and a DNS answer that changes
mid-crawl (rebinding) changes nothing; every hop is checked before it is sent (seeds, links,
redirects, meta refreshes, robots.txt) and every response's peer address again.

``allow_private`` opens private, loopback, link-local and other non-global addresses, never another
scheme; ``allowed_private_hosts`` opens exactly the named ``(host, port)`` pairs (a test's or the
packaged site's own loopback server) and nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from stream2llm.errors import StreamError

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
"""host, port -> IP addresses. The system resolver by default; tests inject a real alternative."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
HostKey = tuple[str, int]

SCHEMES = frozenset({"http", "https"})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the last 32 bits are IPv4
# IETF protocol assignments: not globally reachable (RFC 6890) but for two anycast addresses
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")
_IETF_V4_GLOBAL = frozenset(ipaddress.ip_address(a) for a in ("192.0.0.9", "192.0.0.10"))
_REASONS = ("loopback", "link_local", "site_local", "private", "multicast", "unspecified", "reserved")

logger = logging.getLogger(__name__)


class BlockedURL(StreamError):
    """A URL's host resolves to an address the crawler may not contact (SSRF guard)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(
            f"refusing to crawl {url}: {reason} (pass allow_private=True to crawl local or private hosts)"
        )


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why the crawler must not contact ``address`` (e.g. "loopback"), or None for a public address.

    IPv6 forms that carry an IPv4 address (mapped ``::ffff:0:0/96``, 6to4 ``2002::/16``, NAT64
    ``64:ff9b::/96``, Teredo ``2001::/32``) are judged by the IPv4 address they reach.
    """
    ip = ipaddress.ip_address(address.split("%")[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded:
            reasons = [r for v4 in embedded if (r := blocked_reason(v4))]
            return reasons[0] if reasons else None
    for reason in _REASONS:
        if getattr(ip, f"is_{reason}", False):
            return reason.replace("_", "-")
    if ip in _IETF_V4 and ip not in _IETF_V4_GLOBAL:  # the stdlib misses part of it (3.11)
        return "non-global"
    return None if ip.is_global else "non-global"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 transition address reaches (empty for a plain IPv6 address)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client): both must be public
    return []


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (``getaddrinfo``), scope ids stripped."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


def url_key(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ValueError for any other URL or one without a host."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return parts.scheme, parts.hostname.lower().rstrip("."), port


class AddressGuard:
    """One crawl's address policy and its pinned DNS answers.

    Each ``(host, port)`` is resolved once per crawl; the checked answer (or the refusal) stands for
    the crawl and is what ``PinnedResolver`` hands the downloader. ``refusals`` records every refused
    URL with its reason, for logs and tests. Shared, never copied: scrapy deep-copies its settings.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allowed_private_hosts: Iterable[HostKey] = (),
        resolve: Resolve | None = None,
    ) -> None:
        self.allow_private = allow_private
        hosts = ((h.lower().rstrip("."), int(p)) for h, p in allowed_private_hosts)
        self.allowed_private_hosts = frozenset(hosts)
        self.resolve = resolve or system_resolve
        self.refusals: list[tuple[str, str]] = []
        self._pins: dict[HostKey, asyncio.Future[list[str]]] = {}
        self._verdicts: dict[tuple[str, str, int], str | None] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> AddressGuard:
        return self

    def private_ok(self, host: str, port: int) -> bool:
        """Whether ``host:port`` may be a private or loopback address."""
        return self.allow_private or (host, port) in self.allowed_private_hosts

    async def check(self, url: str) -> list[str]:
        """The pinned addresses ``url`` may be fetched from; BlockedURL if refused, ValueError if it is
        not an http(s) URL or its host does not resolve."""
        _, host, port = url_key(url)
        try:
            return await self.addresses(host, port)
        except BlockedURL as e:
            raise BlockedURL(url, e.reason) from None

    async def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be fetched, or None. The scheme is judged first, then the verdict of
        its (scheme, host, port), made once per crawl."""
        try:
            key = url_key(url)
        except ValueError as e:
            return self._refused(url, str(e))
        if key not in self._verdicts:
            try:
                await self.addresses(key[1], key[2])
                self._verdicts[key] = None
            except (BlockedURL, ValueError) as e:
                self._verdicts[key] = getattr(e, "reason", str(e))
        why = self._verdicts[key]
        return self._refused(url, why) if why else None

    def peer_refusal(self, url: str, peer: IPAddress | None) -> str | None:
        """Why a response from ``peer`` must be dropped: an address that was not the one checked."""
        if peer is None:
            return None
        _, host, port = url_key(url)
        pinned = self._pins.get((host, port))
        checked = pinned.result() if pinned and pinned.done() and not pinned.exception() else None
        if checked is not None and all(ipaddress.ip_address(a) != peer for a in checked):
            return self._refused(url, f"served from {peer}, not a checked address of {host}")
        if not self.private_ok(host, port) and (reason := blocked_reason(peer)):
            return self._refused(url, f"served from {peer}, a {reason} address")
        return None

    async def addresses(self, host: str, port: int) -> list[str]:
        """``host``'s checked addresses, resolved on first use and pinned for the crawl."""
        key = (host.lower().rstrip("."), port)
        if key not in self._pins:
            self._pins[key] = asyncio.ensure_future(self._resolve_checked(*key))
        return list(await asyncio.shield(self._pins[key]))

    async def _resolve_checked(self, host: str, port: int) -> list[str]:
        try:
            ipaddress.ip_address(host.strip("[]"))
            addresses = [host.strip("[]")]  # a literal: nothing to resolve
        except ValueError:
            try:
                addresses = [str(a).split("%")[0] for a in await self.resolve(host, port)]
            except OSError as e:
                raise ValueError(f"cannot resolve {host}: {e}") from None
        if not addresses:
            raise ValueError(f"cannot resolve {host}: no address")
        if not self.private_ok(host, port):
            for address in addresses:
                if reason := blocked_reason(address):
                    raise BlockedURL(host, f"{host} resolves to {address}, a {reason} address")
        return addresses

    def _refused(self, url: str, reason: str) -> str:
        self.refusals.append((url, reason))
        logger.info("refused %s: %s", url, reason)
        return reason


async def check_url(
    url: str,
    *,
    allow_private: bool = False,
    allowed_private_hosts: Iterable[HostKey] = (),
    resolve: Resolve | None = None,
) -> list[str]:
    """Resolve ``url``'s host; raise BlockedURL naming URL and address if any address is not public.

    Returns the resolved addresses. Raises ValueError for a URL that is not http(s) or has no host.
    """
    guard = AddressGuard(
        allow_private=allow_private, allowed_private_hosts=allowed_private_hosts, resolve=resolve
    )
    return await guard.check(url)
