"""Workload identity for the sidecar: SPIFFE certificates from meshd, their renewal, and mTLS.

* ``certs``  — keys, CSRs, SPIFFE ID extraction, checks of an issued certificate (no I/O).
* ``agent``  — ``IdentityAgent``: first certificate by join token, renewal by proof, disk cache.
* ``tls``    — ``TlsContexts`` (atomic swap), ``connect_mtls``/``connector`` for the upstream pool,
  ``accept`` for the inbound listener (STRICT / PERMISSIVE / DISABLE).
"""

from sidecar.identity.agent import IdentityAgent, IdentityStatistics
from sidecar.identity.certs import Credentials, check_issued, renew_at, spiffe_id_of
from sidecar.identity.tls import ANY_IDENTITY, TlsContexts, accept, connect_mtls, connector

__all__ = ["ANY_IDENTITY", "Credentials", "IdentityAgent", "IdentityStatistics", "TlsContexts",
           "accept", "check_issued", "connect_mtls", "connector", "renew_at", "spiffe_id_of"]
