"""Steady HTTP load for the e2e tests, run INSIDE a container (stdlib only; piped to `python -`).

    python - URL HOST SECONDS [WORKERS] [EXPECT] < load.py

WORKERS threads each send one GET after another (urllib: a new connection per request) with the
``Host`` header for SECONDS, and the script prints one JSON line: ``{"ok": n, "failed": n,
"statuses": {...}, "errors": [first 5 failures], "expect_missing": n}``. A request is ok when it
answers 200 and, if EXPECT is given, its body contains EXPECT.
"""

import collections
import json
import sys
import threading
import time
import urllib.error
import urllib.request

url, host, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
expect = sys.argv[5] if len(sys.argv) > 5 else ""
lock = threading.Lock()
counts: collections.Counter = collections.Counter()
statuses: collections.Counter = collections.Counter()
errors: list = []
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def worker(deadline: float) -> None:
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, headers={"Host": host})
        status, body = 0, ""
        try:
            with opener.open(req, timeout=20) as resp:
                status, body = resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode("utf-8", "replace")
        except (OSError, ValueError) as exc:
            status, body = -1, repr(exc)
        good = status == 200 and (not expect or expect in body)
        with lock:
            statuses[str(status)] += 1
            counts["ok" if good else "failed"] += 1
            if status == 200 and not good:
                counts["expect_missing"] += 1
            if not good and len(errors) < 5:
                errors.append({"t": round(time.time(), 3), "status": status, "body": body[:300]})


deadline = time.monotonic() + seconds
threads = [threading.Thread(target=worker, args=(deadline,)) for _ in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(
    json.dumps(
        {
            "ok": counts["ok"],
            "failed": counts["failed"],
            "statuses": dict(statuses),
            "errors": errors,
            "expect_missing": counts["expect_missing"],
        }
    )
)
