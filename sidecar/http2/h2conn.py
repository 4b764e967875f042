"""Construction of ``h2`` connections as the sidecar needs them (no I/O).

``h2`` treats a received GOAWAY as the end of the connection: its state machine goes to
CLOSED and every later frame raises ``ProtocolError``. RFC 9113 §6.8 says the opposite: streams
up to the GOAWAY's last stream id continue. ``new_connection`` keeps the connection OPEN on
RECV_GOAWAY (an instance-level transition table; the library's class table is untouched), so
responses in flight when a peer drains still arrive; callers stop opening streams themselves.

Header checks: received header blocks are validated and normalised by ``h2`` (RFC 9113 §8.2:
uppercase or illegal names, CR/LF/NUL, connection-specific fields, pseudo-header order — the
hardening the attack tests rely on). Outgoing blocks are not re-validated by ``h2``: the
sidecar builds them in ``sidecar.http2.convert``, which applies the same rules once (about a
fifth of ``send_headers``' cost in the profile of the h2 bench).
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.settings
from h2.connection import ConnectionInputs, ConnectionState
from h2.settings import SettingCodes


def new_connection(*, client_side: bool, settings: dict[SettingCodes, int],
                   max_header_list_size: int) -> h2.connection.H2Connection:
    """An ``H2Connection`` (headers as bytes; outgoing ones sent as given, see the module
    docstring) with ``settings`` as its initial local settings and the HPACK decoder capped at
    ``max_header_list_size`` decoded bytes."""
    config = h2.config.H2Configuration(
        client_side=client_side, header_encoding=None,
        validate_inbound_headers=True, normalize_inbound_headers=True,
        validate_outbound_headers=False, normalize_outbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
    conn.decoder.max_header_list_size = max_header_list_size
    machine = conn.state_machine
    table = dict(machine._transitions)
    open_state = ConnectionState.CLIENT_OPEN if client_side else ConnectionState.SERVER_OPEN
    table[(open_state, ConnectionInputs.RECV_GOAWAY)] = (None, open_state)
    machine._transitions = table  # type: ignore[misc]
    return conn
