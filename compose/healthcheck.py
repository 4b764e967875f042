#!/usr/bin/env python3
"""Container healthcheck for the meshd image: exit 0 if the process of this container is healthy.

Checks, first success wins: ``$MESH_HEALTH_URL`` if set; else the sidecar's admin ``/ready``
(``http://127.0.0.1:15000``, a snapshot is applied) and meshd's ``/healthz`` on 15010 over HTTP,
then HTTPS (loopback; the certificate is not checked: this only asks "is it up").
"""

import os
import ssl
import sys
import urllib.request

URLS = ("http://127.0.0.1:15000/ready", "http://127.0.0.1:15010/healthz", "https://127.0.0.1:15010/healthz")
TIMEOUT = 2.0  # seconds per probe


def probe(url: str) -> bool:
    ctx = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=ctx) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    urls = [os.environ["MESH_HEALTH_URL"]] if os.environ.get("MESH_HEALTH_URL") else URLS
    sys.exit(0 if any(probe(u) for u in urls) else 1)
