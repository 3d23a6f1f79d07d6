"""The runner's healthcheck: is the deployment being served, says the Prefect API?

``serve`` registers ``ingest_month/ingest-month`` a few seconds after the runner
starts; a ``prefect deployment run`` sent before that fails with "Deployment not
found". Compose runs ``python -m streamflow.served`` as the runner's healthcheck, so
``docker compose up -d --wait`` returns once runs can be sent: the deployment
exists, is not paused, and is READY (a runner polls for its runs). Plain HTTP on
purpose: importing Prefect for it would cost seconds and ~90 MB every few seconds.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

from .settings import prefect_api_auth, prefect_api_url
from .streams import escape_unencodable

FLOW_NAME = "ingest_month"
DEPLOYMENT_NAME = "ingest-month"


def deployment_url(api_url: str) -> str:
    return f"{api_url.rstrip('/')}/deployments/name/{quote(FLOW_NAME)}/{quote(DEPLOYMENT_NAME)}"


def main() -> int:
    escape_unencodable()  # its lines quote the API's URL and errors
    api_url = prefect_api_url()
    if not api_url:
        print("PREFECT_API_URL is not set: no Prefect server to ask", file=sys.stderr)
        return 1
    request = urllib.request.Request(deployment_url(api_url))  # http(s), from settings
    # Prefect's client sends its basic-auth string the same way.
    auth = prefect_api_auth()
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=4) as response:
            deployment = json.load(response)
    except urllib.error.HTTPError as exc:
        print(
            f"{FLOW_NAME}/{DEPLOYMENT_NAME}: HTTP {exc.code} from the Prefect API", file=sys.stderr
        )
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"Prefect API at {api_url} not reachable: {exc}", file=sys.stderr)
        return 1
    # The record outlives the runner (the prefect database is on a volume): a runner
    # that stopped paused it, and the server marks it READY only while a runner polls.
    if deployment.get("paused") or deployment.get("status") != "READY":
        print(
            f"{FLOW_NAME}/{DEPLOYMENT_NAME} is not being served (status "
            f"{deployment.get('status')}, paused {deployment.get('paused')})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
