"""HTTP/2 (RFC 9113) on the ``h2`` state machine: ``serve_h2`` (downstream), ``H2Pool``
(upstream), ``Transport`` (the HTTP/1.1-or-HTTP/2 seam) and gRPC helpers."""
