"""Who may talk to the HPC SuperLink: its owner, from this host, through the ``flwr`` CLI.

Loopback is not a boundary on a shared login node: every local user can connect to
127.0.0.1. So each request is checked before its body is read:

- **The peer's uid** must be the service's. Linux lists every TCP socket of the network
  namespace in ``/proc/net/tcp{,6}`` with the uid that owns it; the client's end of a
  loopback connection is the row whose local address is the peer's address and whose
  remote address is ours. Nothing new is needed from the stock ``flwr`` CLI. Where the
  uid cannot be read (not Linux, ``/proc`` hidden), the request is refused: fail closed.
- **No browser-shaped requests**: a page the user visits can make the browser POST to
  127.0.0.1 (cross-site) or to a hostile name that resolves to it (DNS rebinding). The
  ``Host`` header must name the address the service listens on, there must be no
  ``Origin`` (the CLI never sends one), and the body must carry the route's own content
  type (``application/protobuf``), which a cross-site form cannot send.
- **Bounded bodies**: a request larger than :data:`MAX_BODY_BYTES` is refused before a
  byte of it is read.

Refusals are answered in Flower's error format (JSON ``{"code", "detail"}``), which the
``flwr`` CLI prints.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from flwr.supercore.error import ApiErrorCode

# A StartRun carries the whole FAB; bound it (and so the service's memory) here.
MAX_BODY_BYTES = int(float(os.environ.get("FLWR_HPC_MAX_FAB_MB", "64")) * 1024 * 1024) + 65536

# Flower's own error codes, which the CLI prints with the detail
NO_PERMISSIONS = int(ApiErrorCode.NO_PERMISSIONS)
FORBIDDEN_ACTION = int(ApiErrorCode.FORBIDDEN_ACTION)
FAILED_TO_CREATE_RUN = int(ApiErrorCode.FAILED_TO_CREATE_RUN)
RUN_ID_NOT_FOUND = int(ApiErrorCode.RUN_ID_NOT_FOUND)
UNSUPPORTED_CONTENT_TYPE = int(ApiErrorCode.UNSUPPORTED_CONTENT_TYPE)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status and the Flower ``ApiErrorCode`` and
    detail of the JSON error body.
    """

    http_status: int
    code: int
    detail: str


def _addr_hex(ip: str, port: int) -> tuple[str, ...]:
    """How ``/proc/net/tcp{,6}`` writes (ip, port): each 32-bit word in host byte order
    (little-endian here), the port big-endian hex. An IPv4 address may appear in the
    tcp6 table as ``::ffff:a.b.c.d``.
    """
    addr = ipaddress.ip_address(ip.split("%")[0])
    port_hex = f"{port:04X}"
    forms = []
    if isinstance(addr, ipaddress.IPv4Address):
        forms.append(addr.packed[::-1].hex().upper() + ":" + port_hex)
        addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    packed = addr.packed
    words = "".join(packed[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    forms.append(words + ":" + port_hex)
    return tuple(forms)


def peer_uid(peer: tuple[str, int], local: tuple[str, int],
             proc_net: Path = Path("/proc/net")) -> int | None:
    """The uid owning the client end of the TCP connection ``peer`` → ``local`` on this
    host, or None when it cannot be read.
    """
    peer_forms, local_forms = set(_addr_hex(*peer[:2])), set(_addr_hex(*local[:2]))
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc_net / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 7 and cols[1] in peer_forms and cols[2] in local_forms:
                return int(cols[7])
    return None


def allowed_hosts(host: str, port: int) -> set[str]:
    """``Host`` headers that name this service (not a name rebound to it)."""
    names = {f"[{host}]" if ":" in host else host, "localhost"}
    return {f"{n}:{port}" for n in names}


def check_request(*, method: str, route: str, headers: Mapping[str, str],
                  peer: tuple[str, int], local: tuple[str, int],
                  owner_uid: int | None = None) -> Refusal | None:
    """Refuse the request unless it comes from the owner, from a client that is not a
    browser, with the route's content type and a bounded body; None: go ahead.
    """
    owner = os.getuid() if owner_uid is None else owner_uid
    uid = peer_uid(peer, local)
    if uid is None:
        return Refusal(403, NO_PERMISSIONS,
                       "flwr-hpc: cannot tell which user opened this connection (the "
                       "service reads it from /proc/net/tcp on Linux), so it is refused; "
                       f"this HPC SuperLink serves only its owner (uid {owner})")
    if uid != owner:
        return Refusal(403, NO_PERMISSIONS,
                       f"flwr-hpc: this HPC SuperLink serves only its owner (uid {owner}, "
                       f"{_user_name(owner)}); your uid is {uid}. Start your own with "
                       "`flwr-hpc up`.")
    lowered = {k.lower(): v for k, v in headers.items()}
    if "origin" in lowered or "sec-fetch-site" in lowered or "sec-fetch-mode" in lowered:
        return Refusal(403, FORBIDDEN_ACTION,
                       "flwr-hpc: requests from web pages are refused (Origin "
                       f"{lowered.get('origin', '?')!r}); use the flwr CLI")
    host = lowered.get("host", "")
    expected = allowed_hosts(local[0], local[1])
    if host not in expected:
        return Refusal(403, FORBIDDEN_ACTION,
                       f"flwr-hpc: Host {host!r} is not this service's address "
                       f"(expected one of {sorted(expected)})")
    if method == "POST":
        want = "application/json" if route.startswith("/hpc/") else "application/protobuf"
        ctype = lowered.get("content-type", "").partition(";")[0].strip().lower()
        if ctype != want:
            return Refusal(415, UNSUPPORTED_CONTENT_TYPE,
                           f"flwr-hpc: {route} takes content type {want!r}, got {ctype!r}")
        try:
            length = int(lowered.get("content-length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            return Refusal(413, FORBIDDEN_ACTION,
                           f"flwr-hpc: the request body ({lowered.get('content-length')} "
                           f"bytes) is over the limit of {MAX_BODY_BYTES:,} bytes (FABs "
                           "up to FLWR_HPC_MAX_FAB_MB, default 64 MB)")
    return None


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return "?"

