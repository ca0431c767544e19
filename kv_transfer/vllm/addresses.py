"""Which address prefill's KV server advertises to decode: interfaces, default route, loopback checks."""

from __future__ import annotations

import logging
import socket
from typing import Any

from transport._control import _is_loopback  # one definition of "loopback" for both layers

from ..errors import KVTransferError

log = logging.getLogger(__name__)

__all__ = ["local_addresses", "resolve_advertise_host", "WILDCARDS"]

#: kv_host values meaning "listen on every interface".
WILDCARDS = ("0.0.0.0", "::", "*", "")


def local_addresses() -> dict[str, list[str]]:
    """This host's (this network namespace's) interfaces and their IP addresses, IPv4 first."""
    try:
        import psutil

        out: dict[str, list[str]] = {}
        for name, addrs in psutil.net_if_addrs().items():
            v4 = [a.address for a in addrs if a.family == socket.AF_INET]
            v6 = [a.address.split("%")[0] for a in addrs if a.family == socket.AF_INET6]
            if v4 or v6:
                out[name] = v4 + v6
        return out
    except Exception:  # noqa: BLE001 - no psutil: loopback and what the host name resolves to
        names = {"127.0.0.1", "::1"}
        try:
            names.update(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
        return {"?": sorted(names)}


def _default_route_interface() -> str | None:
    """The interface of the IPv4 default route (read from /proc/net/route; no packet is sent)."""
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[1] == "00000000" and int(cols[3], 16) & 1:
                    return cols[0]
    except OSError:
        pass
    return None


def resolve_advertise_host(kv_host: str, advertise: Any = None, interface: Any = None) -> str:
    """The address a producer puts in kv_transfer_params, checked against where it listens.

    Raises :class:`KVTransferError` (at startup, naming this host's addresses) when
    ``kv_host`` is not local, ``interface`` is unknown or has no address, or the
    advertised address cannot reach the listener (loopback vs. not).
    """
    local = local_addresses()
    mine = {a for addrs in local.values() for a in addrs}
    have = "; ".join(f"{n}: {', '.join(a)}" for n, a in sorted(local.items())) or "none"
    wildcard = kv_host in WILDCARDS
    bind = kv_host
    if not wildcard and kv_host not in mine:
        try:
            bind = socket.gethostbyname(kv_host)
        except OSError:
            bind = kv_host
        if bind not in mine:
            raise KVTransferError(
                f"UcxConnector: kv_host {kv_host!r} is not an address of this host, so the KV listener cannot "
                f"bind to it (this host has {have}). Set kv_host (PREFILL_HOST in the scripts) to one of them, "
                f"or kv_host 0.0.0.0 with kv_advertise_host / kv_advertise_interface.")
    if interface:
        addrs = local.get(str(interface))
        if not addrs:
            raise KVTransferError(
                f"UcxConnector: kv_advertise_interface {interface!r} "
                f"{'has no IP address' if str(interface) in local else 'does not exist'} on this host "
                f"(interfaces: {have})")
        adv = addrs[0]
        if not wildcard and adv != bind:
            raise KVTransferError(
                f"UcxConnector: kv_advertise_interface {interface!r} has {adv}, but the KV listener binds to "
                f"kv_host {kv_host!r} only: decode could not connect. Use kv_host 0.0.0.0 or {adv}.")
    elif advertise:
        adv = str(advertise)
        if adv in WILDCARDS:
            raise KVTransferError(f"UcxConnector: kv_advertise_host {adv!r} is a wildcard; decode needs an address")
    elif not wildcard:
        adv = kv_host
    else:
        dflt = _default_route_interface()
        cands = [a for a in local.get(dflt or "", []) if not _is_loopback(a)]
        cands += [a for n, addrs in sorted(local.items()) for a in addrs
                  if not _is_loopback(a) and ":" not in a and not a.startswith("169.254.")]
        adv = cands[0] if cands else "127.0.0.1"
        log.info("UcxConnector: kv_host %s: advertising %s (set kv_advertise_host or kv_advertise_interface "
                 "to choose; this host has %s)", kv_host, adv, have)
    if not wildcard and _is_loopback(bind) != _is_loopback(adv):
        raise KVTransferError(
            f"UcxConnector: the KV listener binds to kv_host {kv_host!r} but advertises {adv!r}: "
            + ("a loopback listener cannot be reached from another host; set kv_host to this host's address "
               f"reachable by decode (one of: {have}) or 0.0.0.0" if _is_loopback(bind) else
               "a loopback address only reaches the decode host itself, where nothing listens"))
    if advertise and adv not in mine and not _is_loopback(adv):
        log.warning("UcxConnector: kv_advertise_host %s is not an address of this host (%s); fine behind NAT, "
                    "otherwise decode cannot connect", adv, have)
    return adv
