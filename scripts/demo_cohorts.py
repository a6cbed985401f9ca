"""``make run``'s demo of Cohort Webhooks: open the new store, then have the simulator push.

Waits (at most a minute) for the service to answer, opens its cohort store (a new store:
no Amplitude sync targets it yet), then asks the simulator to push ``cohort_vip`` as
Amplitude would: a full sync, then changes every minute, with duplicates and batches out
of order. Standard library only; every setting comes from the environment run.sh exports.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request


def post(url: str, body: dict[str, object] | None = None, token: str | None = None) -> int:
    data = json.dumps(body or {}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - loopback URLs run.sh builds
        return int(answer.status)


def main() -> int:
    service = f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"
    simulator = os.environ["AMPLITUDE_API_URL"]
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(service + "/healthz", timeout=2)  # noqa: S310
            break
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                print("DEMO MODE: the service did not start; no cohort pushes", file=sys.stderr)
                return 1
            time.sleep(0.2)
    post(service + "/v1/admin/cohorts/open", token=os.environ["DEMO_ADMIN_KEY"])
    receiver = service + "/v1/webhooks/amplitude/cohorts"
    secret = os.environ["COHORT_WEBHOOK_SECRETS"].split(",")[0]
    post(simulator + "/_sim/push", {"url": receiver, "secret": secret, "cohorts": ["cohort_vip"], "every": 60})
    settle = os.environ.get("COHORT_SETTLE_SECONDS", "300")
    print(
        f"DEMO MODE: the simulator pushes cohort_vip to {receiver}; about {settle} s after its full sync,"
        ' /v1/users/ID/cohorts/cohort_vip answers from the pushes ("source":"webhook", no Amplitude call)',
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
