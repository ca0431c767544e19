"""Optional authentication of the control plane: who may get a worker address.

A listener hands its UCX worker address (and the tag its pipe receives on) only
in a :class:`~transport._wire.Welcome`; a peer that gets no Welcome can
neither send to nor fetch from it. Authentication decides who gets a Welcome.
It is **off by default on loopback**. A listener on any other address refuses
to start without it (:class:`LocalUsageError`) unless authentication was
turned off explicitly: ``UCXKV_AUTH=none`` or ``auth=Auth.none()`` (for a
trusted private network; it then logs a warning).

Two modes, both configured by keyword (``auth=`` on :meth:`Pipe.listen`,
:meth:`Pipe.connect`, :class:`PipeListener`, ``LookupServer``, ``LookupClient``)
or by environment (read when ``auth`` is None):

``secret`` - a shared secret and a challenge (HMAC-SHA256), mutual:
    the dialler's Hello carries a fresh nonce; the listener answers with a
    :class:`~transport._wire.Challenge` (its own nonce and a proof that it knows
    the secret); the dialler checks it and repeats its Hello with a proof bound
    to both nonces and to the Hello's worker address, tag and service; only
    then does the listener accept and sign its Welcome. Nonces are single use
    and tied to one connection, so a recorded proof cannot be replayed. Beneath
    that, the ZeroMQ sockets run CURVE with key pairs derived from the secret
    (:meth:`Auth.derived_curve`), so a peer without the secret fails the ZeroMQ
    handshake before it can send any message (the control plane is encrypted too).
    Env: ``UCXKV_AUTH=secret`` and ``UCXKV_SECRET_FILE=path`` (preferred) or
    ``UCXKV_SECRET=...`` (at least 16 characters).

``curve`` - ZeroMQ CURVE (Curve25519 keys; the control plane is encrypted):
    the listener has a key pair and admits only the client public keys it was
    given (checked by a ZAP handler); the dialler has its own key pair and
    must know the listener's public key. A refused client gets no reply at
    all from the listener; :func:`transport._control.dial` watches the
    handshake and raises :class:`PeerRejectedError` naming authentication
    (or a :class:`PeerTimeoutError` that mentions it). Env:
    ``UCXKV_AUTH=curve``, ``UCXKV_CURVE_CERT=path`` (this process's key pair,
    a ZeroMQ ``.key_secret`` certificate), ``UCXKV_CURVE_SERVER_CERT=path``
    (the listeners' public certificate, for diallers) and
    ``UCXKV_CURVE_CLIENTS=dir`` (a directory of admitted clients' public
    ``*.key`` certificates, for listeners). ``python -m transport.auth keygen
    DIR NAME`` writes a certificate pair.

A dialler with authentication on refuses a listener that does not prove the
same (a Welcome without proof, or a CURVE handshake that fails), and a
listener with authentication on refuses a dialler without it; mixing the two
is an error, never a silent downgrade.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import LocalUsageError

__all__ = ["Auth", "NONCE_BYTES", "MIN_SECRET_BYTES"]

NONCE_BYTES = 32
MIN_SECRET_BYTES = 16
_MODES = ("none", "secret", "curve")


@dataclass(frozen=True)
class Auth:
    """How a pipe authenticates its control plane. Build with :meth:`none`, :meth:`secret`, :meth:`curve` or :meth:`from_env`."""

    mode: str = "none"
    shared_secret: bytes = field(default=b"", repr=False)
    #: This process's CURVE key pair (z85, 40 bytes each).
    curve_public: bytes = b""
    curve_secret: bytes = field(default=b"", repr=False)
    #: The listener's public key a dialler expects (z85).
    curve_server_key: bytes = b""
    #: Client public keys (z85) a listener admits.
    curve_clients: frozenset = frozenset()
    #: False only for "none" read from an environment without ``UCXKV_AUTH``: such a
    #: listener may bind only loopback addresses (see the module docstring).
    explicit: bool = True

    # -- constructors ----------------------------------------------------
    @classmethod
    def none(cls) -> "Auth":
        return cls()

    @classmethod
    def secret(cls, secret: str | bytes) -> "Auth":
        """Shared-secret challenge authentication (``secret`` of at least 16 bytes)."""
        s = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(s) < MIN_SECRET_BYTES:
            raise LocalUsageError(
                f"auth secret is {len(s)} bytes; use at least {MIN_SECRET_BYTES} "
                "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
        return cls(mode="secret", shared_secret=s)

    @classmethod
    def curve(cls, public: bytes | str, secret: bytes | str, *, server_key: bytes | str = b"",
              clients: Iterable[bytes | str] = ()) -> "Auth":
        """CURVE with this process's key pair; ``server_key`` to dial, ``clients`` to listen."""
        import zmq

        if not zmq.has("curve"):
            raise LocalUsageError("this libzmq has no CURVE support; use Auth.secret(...) instead")

        def key(k: bytes | str, what: str) -> bytes:
            b = k.encode() if isinstance(k, str) else bytes(k)
            if len(b) != 40:
                raise LocalUsageError(f"CURVE {what} must be a 40-character z85 key, got {len(b)} bytes")
            return b

        return cls(mode="curve", curve_public=key(public, "public key"), curve_secret=key(secret, "secret key"),
                   curve_server_key=key(server_key, "server key") if server_key else b"",
                   curve_clients=frozenset(key(c, "client key") for c in clients))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Auth":
        """The configuration the ``UCXKV_AUTH*`` variables describe (see the module docstring)."""
        env = os.environ if env is None else env
        mode = env.get("UCXKV_AUTH", "").strip().lower()
        if not mode:
            return cls(explicit=False)
        if mode not in _MODES:
            raise LocalUsageError(f"UCXKV_AUTH={mode!r}: expected one of {', '.join(_MODES)}")
        if mode == "none":
            return cls()
        if mode == "secret":
            path = env.get("UCXKV_SECRET_FILE")
            if path:
                try:
                    with open(path, "rb") as f:
                        return cls.secret(f.read().strip())
                except OSError as exc:
                    raise LocalUsageError(f"UCXKV_SECRET_FILE={path}: {exc}") from None
            if env.get("UCXKV_SECRET"):
                return cls.secret(env["UCXKV_SECRET"])
            raise LocalUsageError("UCXKV_AUTH=secret needs UCXKV_SECRET_FILE or UCXKV_SECRET")
        from zmq.auth import load_certificate, load_certificates

        cert = env.get("UCXKV_CURVE_CERT")
        if not cert:
            raise LocalUsageError("UCXKV_AUTH=curve needs UCXKV_CURVE_CERT (this process's .key_secret file)")
        try:
            pub, sec = load_certificate(cert)
            if sec is None:
                raise ValueError("it holds no secret key")
            server = load_certificate(env["UCXKV_CURVE_SERVER_CERT"])[0] if env.get("UCXKV_CURVE_SERVER_CERT") else b""
            clients = list(load_certificates(env["UCXKV_CURVE_CLIENTS"])) if env.get("UCXKV_CURVE_CLIENTS") else []
        except (OSError, ValueError) as exc:
            raise LocalUsageError(f"UCXKV_AUTH=curve: cannot load certificates: {exc}") from None
        return cls.curve(pub, sec, server_key=server, clients=clients)

    @staticmethod
    def resolve(auth: "Auth | None") -> "Auth":
        """``auth`` itself, or the environment's configuration when None."""
        if auth is None:
            return Auth.from_env()
        if not isinstance(auth, Auth):
            raise LocalUsageError(f"auth: expected a transport.auth.Auth or None, got {type(auth).__name__}")
        return auth

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    # -- shared-secret proofs ----------------------------------------------
    def mac(self, label: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 over ``label`` and length-prefixed ``parts`` (unambiguous)."""
        h = hmac.new(self.shared_secret, label, hashlib.sha256)
        for p in parts:
            h.update(struct.pack("<I", len(p)))
            h.update(p)
        return h.digest()

    def verify(self, proof: bytes, label: bytes, *parts: bytes) -> bool:
        return hmac.compare_digest(proof, self.mac(label, *parts))

    # -- the CURVE keys a shared secret implies ------------------------------
    def derived_curve(self, role: str) -> tuple[bytes, bytes]:
        """The CURVE key pair (z85 public, z85 secret) every holder of the shared secret derives for ``role``.

        ``role`` is ``"server"`` (listeners) or ``"client"`` (diallers). A
        listener in ``secret`` mode runs CURVE with the server pair and admits
        only the client public key, so the ZeroMQ handshake itself needs the
        secret: a peer without it never gets a message, or a message part,
        buffered by the listener (issue 15, class 3).
        """
        import zmq
        import zmq.utils.z85

        if self.mode != "secret":
            raise LocalUsageError(f"derived CURVE keys need shared-secret mode, not {self.mode!r}")
        if role not in ("server", "client"):
            raise LocalUsageError(f"derived CURVE key role must be 'server' or 'client', got {role!r}")
        if not zmq.has("curve"):
            raise LocalUsageError("this libzmq has no CURVE support, which shared-secret mode needs "
                                  "(pyzmq's bundled libzmq has it)")
        secret = zmq.utils.z85.encode(self.mac(b"ucxkv-curve-key-v1", role.encode()))
        return zmq.curve_public(secret), secret


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "keygen":
        print("usage: python -m transport.auth keygen DIR NAME   (writes DIR/NAME.key and DIR/NAME.key_secret)")
        return 2
    from zmq.auth import create_certificates

    os.makedirs(argv[1], exist_ok=True)
    pub, sec = create_certificates(argv[1], argv[2])
    os.chmod(sec, 0o600)
    print(f"public certificate: {pub}\nsecret certificate: {sec} (keep private)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
