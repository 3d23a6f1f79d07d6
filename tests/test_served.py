"""The runner's healthcheck (``python -m streamflow.served``) against a real Prefect
server that requires basic auth, as the compose stack's does when
PREFECT_SERVER_API_AUTH_STRING is set: it must send the runner's
PREFECT_API_AUTH_STRING the way Prefect's own client does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FLOW_DIR
from month_files import migrated_prefect_home, prefect_server

SECRET = "admin:s3cret-for-the-ui"


def served(api: str, auth: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(FLOW_DIR)}
    env.pop("PREFECT_API_AUTH_STRING", None)
    if auth is not None:
        env["PREFECT_API_AUTH_STRING"] = auth
    return subprocess.run(
        [sys.executable, "-m", "streamflow.served"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_healthcheck_passes_the_servers_basic_auth(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", SECRET)
    home = migrated_prefect_home(tmp_path / "prefect")
    with prefect_server(home) as api:
        without, wrong, right = (served(api, a) for a in (None, "admin:wrong", SECRET))

    assert (without.returncode, wrong.returncode) == (1, 1)
    assert "HTTP 401 from the Prefect API" in without.stderr
    assert "HTTP 401 from the Prefect API" in wrong.stderr
    # Past the server's auth: no runner has registered the deployment here.
    assert right.returncode == 1, right.stderr
    assert "ingest_month/ingest-month: HTTP 404 from the Prefect API" in right.stderr


@pytest.mark.parametrize("auth", [None, SECRET])
def test_without_a_server_the_healthcheck_says_so(auth):
    result = served("http://127.0.0.1:9/api", auth)
    assert result.returncode == 1
    assert "Prefect API at http://127.0.0.1:9/api not reachable" in result.stderr


def test_the_deployment_describes_its_parameters():
    """The UI's form for a deployment run showed seed_dir, as_of and its flags
    with no word on what each takes (Prefect reads the flow's docstring for them)."""
    import ingest_flow
    from prefect.utilities.callables import parameter_schema

    props = parameter_schema(ingest_flow.ingest_month.fn).model_dump()["properties"]

    assert set(props) == {"seed_dir", "as_of", "replace", "allow_gap", "allow_drop"}
    assert all(p.get("description") for p in props.values()), props
    assert "YYYY-MM-DD" in props["as_of"]["description"]


def test_the_healthcheck_imports_neither_prefect_nor_psycopg():
    """Compose runs it every few seconds in the runner: it reads PREFECT_API_URL through
    settings.py (the one place for configuration) without paying for psycopg (~13 MB,
    50 ms a check) or Prefect (seconds, ~90 MB)."""
    code = "import sys, streamflow.served; print(sorted({'psycopg', 'prefect'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(FLOW_DIR)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"
