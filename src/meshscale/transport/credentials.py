"""What a caller presents to a node: its certificate (in a TLS context) and a token.

A user's commands and ``meshscale.connect`` use a client bundle, or the admin bundle (it
carries an admin client certificate); a node's own calls to other nodes use its node
certificate. A node bundle is not accepted where a client is meant: a node certificate
may call node-to-node methods, which no user should hold.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from meshscale.transport.tls import client_context
from meshscale.trust.bundle import Bundle, BundleError, BundleKind
from meshscale.trust.certs import Role, utc_now


@dataclass(frozen=True)
class Credentials:
    ssl_context: ssl.SSLContext = field(repr=False)
    token: str = field(default="", repr=False)
    """Sent with every request; empty when the certificate alone speaks (a node). A
    token narrows what the certificate's role may do (a read-only token on an admin
    certificate reads only); a wrong one is refused."""
    name: str = ""
    role: Role = Role.ADMIN

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> Credentials:
        """A client's credentials: from a client bundle or the admin bundle."""
        bundle.require(BundleKind.CLIENT, BundleKind.ADMIN, use="a client")
        check_not_expired(bundle)
        return cls(client_context(bundle), bundle.token or "", bundle.name, bundle.role)

    @classmethod
    def for_node(cls, bundle: Bundle) -> Credentials:
        """A node's credentials for its calls to other nodes (its own certificate)."""
        bundle.require(BundleKind.NODE, use="a node")
        return cls(client_context(bundle), "", bundle.name, Role.NODE)


def check_not_expired(bundle: Bundle) -> None:
    """``BundleError`` if the bundle's certificate has ended (a node would refuse it)."""
    info = bundle.cert
    if info.not_after <= utc_now():
        how = ("meshscale bundle node --renew" if bundle.kind is BundleKind.NODE
               else "meshscale bundle client" if bundle.kind is BundleKind.CLIENT
               else "meshscale init")
        raise BundleError(f"{bundle.path}: the certificate of {info.role} {info.name!r} "
                          f"expired on {info.not_after:%Y-%m-%d}; issue a new one with `{how}`")
