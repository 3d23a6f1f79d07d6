"""db/init run the way the postgres image runs it, on a new cluster: its entrypoint
creates POSTGRES_DB, then executes each executable ``*.sh`` and feeds each ``*.sql`` to
psql as POSTGRES_USER, in name order, with the container's environment. No Docker
here: the cluster is the pgserver wheel's PostgreSQL 16 and psql, the scripts the
real ones. Then the runner's login publishes a month as the flow would in the stack.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import REPO
from month_files import AS_OF, ok, small_months
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from streamflow import bootstrap

INIT_DIR = REPO / "db" / "init"


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_months(tmp_path_factory.mktemp("small"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A new cluster, like an empty pgdata volume: (superuser conninfo parts, bin dir)."""
    import pgserver

    server = pgserver.get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        parts = conninfo_to_dict(server.get_uri())
        parts["bin"] = str(Path(pgserver.__file__).parent / "pginstall" / "bin")
        yield {k: str(v) for k, v in parts.items()}
    finally:
        server.cleanup()


def run_init(cluster: dict[str, str], **env: str) -> subprocess.CompletedProcess[str]:
    """The entrypoint's init phase: POSTGRES_DB, then db/init/* in order. Stops at the
    first failure, as the entrypoint does (set -e)."""
    container = {
        "PATH": f"{cluster['bin']}:{os.environ['PATH']}",
        "PGHOST": cluster["host"],
        "PGPORT": cluster.get("port", "5432"),
        "POSTGRES_USER": cluster["user"],
        "POSTGRES_DB": "streamflow",
        "PREFECT_DB_USER": "prefect",
        "PREFECT_DB_PASSWORD": "pw-prefect",
        "INGEST_DB_USER": "streamflow_app",
        "INGEST_DB_PASSWORD": "pw-ingest",
        "POSTGRES_PASSWORD": "pw-superuser",
        **env,
    }
    psql = ["psql", "-v", "ON_ERROR_STOP=1", "--username", cluster["user"], "--no-password"]
    steps = [[*psql, "--dbname", "postgres", "-c", 'CREATE DATABASE "streamflow"']]
    for script in sorted(INIT_DIR.iterdir()):
        if script.suffix == ".sh":
            steps.append([str(script)])
        elif script.suffix == ".sql":
            steps.append([*psql, "--no-psqlrc", "--dbname", "streamflow", "-q", "-f", str(script)])
    result = None
    for step in steps:
        result = subprocess.run(step, env=container, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            break
    assert result is not None
    return result


def healthcheck(cluster: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The postgres service's healthcheck after pg_isready: db/healthcheck.sql, run the
    way docker-compose.yml runs it (psql, ON_ERROR_STOP, as the superuser)."""
    env = {
        "PATH": f"{cluster['bin']}:{os.environ['PATH']}",
        "PGHOST": cluster["host"],
        "PGPORT": cluster.get("port", "5432"),
    }
    command = ["psql", "--no-psqlrc", "--quiet", "--set=ON_ERROR_STOP=1", "--no-password"]
    command += ["--username", cluster["user"], "--dbname", "streamflow"]
    command += ["--file", str(REPO / "db" / "healthcheck.sql")]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def login_url(cluster: dict[str, str], user: str, dbname: str = "streamflow") -> str:
    return make_conninfo(host=cluster["host"], port=cluster.get("port"), user=user, dbname=dbname)


def test_the_init_scripts_make_a_database_the_runners_login_can_publish_to(
    cluster, run_flow, months
):
    result = run_init(cluster)

    assert result.returncode == 0, result.stderr
    assert 'login role "streamflow_app" is a member of streamflow_ingest' in result.stdout
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres")) as admin:
        owner = admin.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'prefect'"
        ).fetchone()
        assert owner == ("prefect",)
        login = admin.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, "
            "pg_has_role('streamflow_app', 'streamflow_ingest', 'MEMBER') "
            "FROM pg_roles WHERE rolname = 'streamflow_app'"
        ).fetchone()
        assert login == (False, False, False, True)
    url = login_url(cluster, "streamflow_app")
    rc, out, err = run_flow(url, months / "month_000", AS_OF["month_000"])
    assert rc == 0, err[-2000:]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM labels_snapshots").fetchone()[0] > 0


def _scram_matches(secret: str, password: str) -> bool:
    """Whether pg_authid's SCRAM-SHA-256 secret was made from ``password`` (RFC 5802)."""
    method, rest = secret.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return method == "SCRAM-SHA-256" and (
        base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
    )


def test_passwords_reach_their_roles_but_never_a_command_line(cluster, tmp_path):
    """psql's arguments are world-readable while it runs (/proc/<pid>/cmdline, ps):
    the init scripts passed both passwords there as --set values."""
    shim = tmp_path / "shim"
    shim.mkdir()
    calls = tmp_path / "psql_calls"
    (shim / "psql").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec {cluster["bin"]}/psql "$@"\n'
    )
    (shim / "psql").chmod(0o755)
    path = f"{shim}:{cluster['bin']}:{os.environ['PATH']}"
    result = run_init(
        cluster, PATH=path, PREFECT_DB_PASSWORD="pw-P-42", INGEST_DB_PASSWORD="pw-I-42"
    )

    assert result.returncode == 0, result.stderr
    argv = calls.read_text()
    assert argv.count("\n") >= 3  # the scripts' psql calls went through the shim
    assert "pw-P-42" not in argv and "pw-I-42" not in argv
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres")) as admin:
        secrets = dict(
            admin.execute(
                "SELECT rolname, rolpassword FROM pg_authid "
                "WHERE rolname IN ('prefect', 'streamflow_app')"
            ).fetchall()
        )
    assert _scram_matches(secrets["prefect"], "pw-P-42")
    assert _scram_matches(secrets["streamflow_app"], "pw-I-42")


def test_only_the_pipelines_roles_connect_to_its_database(cluster):
    """PostgreSQL lets PUBLIC connect to a new database (and make temporary tables):
    Prefect's login could open sessions in the pipeline's."""
    assert run_init(cluster).returncode == 0
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres"), autocommit=True) as c:
        c.execute("CREATE ROLE feature_store LOGIN IN ROLE streamflow_reader")
        c.execute("CREATE ROLE someone_else LOGIN")
    for login in ("streamflow_app", "feature_store"):
        with psycopg.connect(login_url(cluster, login)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (login,)
            conn.execute("CREATE TEMP TABLE scratch (x int)")  # analysis space stays
    for login in ("prefect", "someone_else"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(login_url(cluster, login))
    with psycopg.connect(login_url(cluster, "prefect", "prefect")) as conn:  # its own
        assert conn.execute("SELECT current_database()").fetchone() == ("prefect",)


def test_the_maintenance_database_stays_open(cluster):
    """The embedded server keeps the pipeline in the cluster's database "postgres",
    which every client and tool expects to reach: 001 leaves its CONNECT alone."""
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres"), autocommit=True) as c:
        bootstrap.apply_init_sql(c)
        c.execute("CREATE ROLE someone_else LOGIN")
    with psycopg.connect(login_url(cluster, "someone_else", "postgres")) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)


def test_an_ingest_login_named_like_the_prefect_role_stops_the_init(cluster):
    """002 kept the existing role (WHERE NOT EXISTS) and said all was well: the runner's
    password was then refused, and Prefect's role held the pipeline's privileges."""
    result = run_init(cluster, INGEST_DB_USER="prefect")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        '002_ingest_login.sh: role "prefect" already exists; INGEST_DB_USER must name a new '
        "login, other than PREFECT_DB_USER and POSTGRES_USER"
    )
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres")) as admin:
        member = admin.execute("SELECT pg_has_role('prefect', 'streamflow_ingest', 'MEMBER')")
        assert member.fetchone() == (False,)


def test_shell_scripts_are_checked_out_with_lf_line_ends():
    """Git for Windows checks text out with CRLF by default: the image then fails on
    '/usr/bin/env: bash\\r', and a restarted container looks healthy, half initialised."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    scripts = [str(p.relative_to(REPO)) for p in sorted(INIT_DIR.glob("*.sh"))]
    scripts += [".ci/run", "db/entrypoint.sh", "scripts/demo.sh", "scripts/test.sh"]
    out = subprocess.run(
        ["git", "-C", str(REPO), "check-attr", "eol", "--", *scripts],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [f"{s}: eol: lf" for s in scripts]


@pytest.mark.parametrize("group", ["streamflow_ingest", "streamflow_reader"])
def test_a_prefect_role_named_like_a_group_role_stops_the_init(cluster, group):
    """000 made a login of that name, 001 kept it as the group: every script said all
    was well, the ingest login (or every reader) then owned Prefect's database."""
    result = run_init(cluster, PREFECT_DB_USER=group)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "000_prefect_db.sh: PREFECT_DB_USER must differ from the group roles "
        "streamflow_ingest and streamflow_reader"
    )


def test_the_schema_refuses_a_login_in_place_of_a_group_role(cluster):
    """Outside the image (the schema applied by hand to a cluster that has such a
    login), 001 itself stops."""
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres"), autocommit=True) as c:
        c.execute("CREATE ROLE streamflow_reader LOGIN")
    result = run_init(cluster)

    assert result.returncode != 0
    assert "role streamflow_reader exists and can log in" in result.stderr


def test_the_healthcheck_passes_once_the_init_scripts_are_done(cluster):
    assert run_init(cluster).returncode == 0
    result = healthcheck(cluster)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "variable", ["POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "INGEST_DB_PASSWORD"]
)
def test_a_placeholder_password_stops_the_init_and_the_healthcheck_says_so(cluster, variable):
    """`cp .env.example .env` then `up`: the stack came up with .env.example's public
    passwords. Now the first script refuses, before it creates anything; the restarted
    container (the image skips db/init on a non-empty volume) stays unhealthy, saying
    what to do, instead of serving a half-initialised cluster as healthy."""
    result = run_init(cluster, **{variable: "change-me-something"})

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"000_prefect_db.sh: {variable} starts with change-me, like .env.example's "
        "placeholders; set a password of your own in .env (e.g. openssl rand -hex 24), then "
        "docker compose down -v (this deletes the database volume) and up again"
    )
    with psycopg.connect(login_url(cluster, cluster["user"], "postgres")) as admin:
        roles = admin.execute(
            "SELECT rolname FROM pg_roles WHERE rolname IN ('prefect', 'streamflow_app')"
        ).fetchall()
        assert roles == []
    check = healthcheck(cluster)
    assert check.returncode != 0
    assert "db/init did not finish on this volume" in check.stderr


def test_the_healthcheck_fails_when_the_last_script_did_not_run(cluster):
    """000 and 001 done, 002 failed (a login name already taken): Prefect's database is
    there, the runner's login is not."""
    result = run_init(cluster, INGEST_DB_USER="prefect")
    assert result.returncode == 1
    check = healthcheck(cluster)
    assert check.returncode != 0
    assert "db/init did not finish on this volume" in check.stderr


def test_a_pipeline_database_named_prefect_stops_the_init(cluster):
    """000 found the database "prefect" (the entrypoint makes POSTGRES_DB first) and
    kept it: owned by the superuser, Prefect's role could not migrate it."""
    result = run_init(cluster, POSTGRES_DB="prefect")

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        '000_prefect_db.sh: POSTGRES_DB must not be "prefect", the Prefect server\'s own database'
    )


@pytest.mark.parametrize(
    "variable", ["POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "INGEST_DB_PASSWORD"]
)
def test_the_postgres_entrypoint_refuses_placeholders_before_initdb(tmp_path, variable):
    """000 refuses them too, but after initdb: the cluster then had the public superuser
    password. db/entrypoint.sh (the compose service's entrypoint) refuses them on every
    start, before the image's docker-entrypoint.sh; real passwords go through to it."""
    called = tmp_path / "called"
    fake = tmp_path / "bin" / "docker-entrypoint.sh"  # the image's, recording its arguments
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {called}\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "POSTGRES_PASSWORD": "pw-superuser",
        "PREFECT_DB_PASSWORD": "pw-prefect",
        "INGEST_DB_PASSWORD": "pw-ingest",
    }
    script = str(REPO / "db" / "entrypoint.sh")

    ok = subprocess.run(["bash", script, "postgres"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert called.read_text() == "postgres\n"
    called.unlink()

    refused = subprocess.run(
        ["bash", script, "postgres"],
        env={**env, variable: "change-me-postgres-superuser"},
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"postgres: {variable} starts with change-me, like .env.example's placeholders; set "
        "a password of your own in .env (e.g. openssl rand -hex 24), then docker compose up "
        "again"
    )
    assert not called.exists()


def sql_without_comments(text: str) -> str:
    """The SQL PostgreSQL runs: ``--`` comments (outside quotes) and blank lines dropped,
    trailing spaces stripped. A comment inside a function body is stored with it, but
    changes nothing it does."""
    lines = []
    for line in text.splitlines():
        quoted = False
        for i, char in enumerate(line):
            if char == "'":
                quoted = not quoted
            elif char == "-" and not quoted and line.startswith("--", i):
                line = line[:i]
                break
        # A literal spanning lines, or spelt E'...' or $tag$...$tag$, would be read wrong.
        assert not quoted, f"a quote left open at the end of: {line}"
        if line.strip():
            lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def test_sql_without_comments_keeps_what_is_quoted():
    text = "-- why\nSELECT '--kept', 1;  -- why not\n\n  -- indented\nSELECT 'it''s -- kept';\n"
    assert sql_without_comments(text) == "SELECT '--kept', 1;\nSELECT 'it''s -- kept';\n"


# The SQL of db/init/001_schema.sql (comments aside) as each version of it ends
# (bootstrap.SCHEMA_VERSION, read from the file): an edit that does not raise the
# version reaches new databases only (ensure_schema leaves a database of the same
# version alone). Raise the version its streamflow_schema_version() returns, then
# record the new sha256 here. A comment-only edit keeps the version: it changes nothing
# a database does, and a new version makes every Docker volume wait for a superuser.
SCHEMA_SHA256 = {
    2: "c5bc50dd2697cffaa7ebd2aa19c3d23d4e41f245bafb53cd2d78d138e022075c",
}


def test_a_changed_schema_file_raises_its_version():
    text = (INIT_DIR / "001_schema.sql").read_text(encoding="utf-8")
    # What sql_without_comments cannot read: E'' strings (a quote escaped by a backslash)
    # and dollar quotes other than $$ (a -- inside one is not a comment).
    assert not re.search(r"\bE'|\$\w+\$", text), "sql_without_comments would misread this"
    digest = hashlib.sha256(sql_without_comments(text).encode()).hexdigest()
    assert digest == SCHEMA_SHA256.get(bootstrap.SCHEMA_VERSION), (
        "db/init/001_schema.sql's SQL changed: raise the version its "
        "streamflow_schema_version() returns, and record the new sha256 in SCHEMA_SHA256 "
        f"({digest})"
    )


# Tables of the pipeline's names in another shape: the lab's own history tables were
# plain tables, and another tool's may lack a column.
LAB_TABLES = """
CREATE TABLE users (user_id TEXT PRIMARY KEY, signup_date DATE, user_gender TEXT,
    user_is_senior BOOLEAN, has_family BOOLEAN, has_dependents BOOLEAN);
CREATE TABLE support_agg_90d (user_id TEXT PRIMARY KEY REFERENCES users,
    support_tickets_90d INTEGER);
CREATE TABLE usage_agg_30d_snapshots (user_id TEXT NOT NULL, as_of DATE NOT NULL,
    watch_hours_30d NUMERIC, avg_session_mins_7d NUMERIC, unique_devices_30d INTEGER,
    skips_7d INTEGER, rebuffer_events_7d INTEGER, PRIMARY KEY (user_id, as_of));
CREATE TABLE labels_snapshots (user_id TEXT NOT NULL, as_of DATE NOT NULL,
    churn_label BOOLEAN, PRIMARY KEY (user_id, as_of));
INSERT INTO usage_agg_30d_snapshots VALUES ('lab-1', '2023-12-31', 1.5, 2, 3, 4, 5);
"""


def test_tables_of_another_shape_are_refused_before_anything_is_created(
    empty_db_url, run_flow, tmp_path
):
    """A database holding the lab's own tables: db/init's CREATE TABLE IF NOT EXISTS
    kept them, and the month failed at its very end ('usage_agg_30d_snapshots is not
    partitioned', with a traceback). Refused first, in words, nothing created; moved to
    a schema of their own (docs/stack.md), they stay, and the month publishes."""
    months = small_months(tmp_path)
    with psycopg.connect(empty_db_url) as conn:
        conn.execute(LAB_TABLES)
    rc, _, err = run_flow(empty_db_url, months / "month_000", AS_OF["month_000"])
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: this database already has tables of the pipeline's names that it "
        "did not create (the lab's own schema?): usage_agg_30d_snapshots is not "
        "partitioned by as_of, support_agg_90d has no ticket_avg_resolution_hrs_90d, "
        "labels_snapshots is not partitioned by as_of. Nothing was changed: move all of "
        "the lab's tables to a schema of their own, or use an empty database (docs/stack.md, "
        "'Coming from the lab's database')"
    )
    with psycopg.connect(empty_db_url) as conn:
        created = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname IN ('public', 'staging') AND c.relkind IN ('r', 'p')"
        ).fetchone()
        assert created == (4,)  # the lab's four, nothing of the pipeline's
        assert conn.execute("SELECT to_regnamespace('staging')").fetchone() == (None,)
        conn.execute(
            "CREATE SCHEMA lab;"
            "ALTER TABLE users SET SCHEMA lab; ALTER TABLE support_agg_90d SET SCHEMA lab;"
            "ALTER TABLE usage_agg_30d_snapshots SET SCHEMA lab;"
            "ALTER TABLE labels_snapshots SET SCHEMA lab"
        )
    rc, _, err = run_flow(empty_db_url, months / "month_000", AS_OF["month_000"])
    assert rc == 0, err[-3000:]
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT user_id FROM lab.usage_agg_30d_snapshots").fetchall() == [
            ("lab-1",)
        ]
        assert conn.execute("SELECT count(*) FROM usage_agg_30d_snapshots").fetchone() == (200,)


def restored_elsewhere(db_url: str, cluster: dict[str, str], tmp_path: Path, *before: str) -> str:
    """``db_url``'s database dumped (pg_dump -Fc, as its superuser) and restored into
    ``cluster``, a new one, after running ``before`` there: the URL of the copy, as the
    cluster's superuser. pg_restore's errors (roles the new cluster lacks) are expected."""
    binaries = Path(cluster["bin"])
    dump = tmp_path / "streamflow.dump"
    subprocess.run([binaries / "pg_dump", "-Fc", "-f", dump, "-d", db_url], check=True, timeout=120)
    admin = make_conninfo(host=cluster["host"], port=cluster.get("port"), user=cluster["user"])
    with psycopg.connect(admin, dbname="postgres", autocommit=True) as conn:
        conn.execute('CREATE DATABASE "streamflow"')
        for statement in before:
            conn.execute(statement)  # type: ignore[arg-type]
    restored = login_url(cluster, cluster["user"])
    subprocess.run(
        [binaries / "pg_restore", "-d", restored, dump], capture_output=True, timeout=120
    )
    return restored


def test_a_dump_restored_into_another_cluster_gets_db_inits_grants_back(
    db_url, cluster, run_flow, months, tmp_path, caplog
):
    """Roles live in the cluster, not in a dump: restored into a new cluster, the
    database came back without streamflow_ingest and streamflow_reader, pg_restore's
    failed GRANTs left the functions that run with their owner's rights to PUBLIC, and
    the next month failed at its end ('unexpected UndefinedObject: role
    "streamflow_ingest" does not exist'). A superuser's run applies db/init again."""
    ok(run_flow(db_url, months / "month_000", AS_OF["month_000"]))
    restored = restored_elsewhere(db_url, cluster, tmp_path)
    public_may_run = (
        "SELECT has_function_privilege('public', "
        "'streamflow_new_month_partition(text, date)', 'EXECUTE')"
    )
    with psycopg.connect(restored) as conn:
        assert conn.execute(public_may_run).fetchone() == (True,)
    with caplog.at_level(logging.WARNING):
        rc, _, err = run_flow(restored, months / "month_001", AS_OF["month_001"])
    assert rc == 0, err[-3000:]
    assert (
        "db/init/001_schema.sql applied again (the two groups' privileges are its own "
        "again): the database's roles or grants are not db/init's (no role "
        "streamflow_ingest, no role streamflow_reader, PUBLIC may run "
        "streamflow_drop_staged_months(), which runs with its owner's rights, PUBLIC may "
        "run streamflow_new_month_partition(text, date), which runs with its owner's "
        "rights, PUBLIC may run streamflow_index_month_partition(text, date), which runs "
        "with its owner's rights (+3 more): a restore into another cluster?)"
    ) in caplog.text
    with psycopg.connect(restored) as conn:
        assert conn.execute(public_may_run).fetchone() == (False,)
        published = conn.execute("SELECT as_of::text FROM ingest_months ORDER BY 1").fetchall()
        assert published == [(AS_OF["month_000"],), (AS_OF["month_001"],)]


def test_a_restore_the_ingest_login_cannot_mend_is_named_before_the_month(
    db_url, cluster, run_flow, months, tmp_path
):
    """The group roles made by hand before the restore: the grants on tables and
    functions come back, the cluster's grant of session_replication_role does not, and
    the ingest login's month failed at publishing with 'the login needs the
    streamflow_ingest role', which it has. Refused first, in words; applied by a
    superuser, the same login publishes."""
    ok(run_flow(db_url, months / "month_000", AS_OF["month_000"]))
    restored = restored_elsewhere(
        db_url,
        cluster,
        tmp_path,
        "CREATE ROLE streamflow_ingest NOLOGIN",
        "CREATE ROLE streamflow_reader NOLOGIN",
        "CREATE ROLE app LOGIN IN ROLE streamflow_ingest",
    )
    app = login_url(cluster, "app")
    rc, _, err = run_flow(app, months / "month_001", AS_OF["month_001"])
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "ingest failed: the database's roles or grants are not db/init's (streamflow_ingest "
        "may not SET session_replication_role: a restore into another cluster?), and this "
        "login may not update it: have a superuser (the login that initialised it; "
        "POSTGRES_USER in Docker) run db/init/001_schema.sql once (it is idempotent)"
    )
    with psycopg.connect(restored) as conn:
        assert conn.execute("SELECT count(*) FROM ingest_runs").fetchone() == (1,)
        conn.execute((INIT_DIR / "001_schema.sql").read_text(encoding="utf-8"))  # type: ignore[arg-type]
    ok(run_flow(app, months / "month_001", AS_OF["month_001"]))


def test_a_newer_versions_database_is_left_alone(db_url, run_flow, months, caplog):
    """A database of a newer pipeline (db/init's version above this one's) that lacks a
    grant: this older code must not apply its own, older db/init to it (its functions
    would go back), even as a superuser; the run goes on as before."""
    newer = bootstrap.SCHEMA_VERSION + 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION streamflow_schema_version() RETURNS integer "  # type: ignore[arg-type]
            f"LANGUAGE sql IMMUTABLE AS 'SELECT {newer}'"
        )
        conn.execute("GRANT EXECUTE ON FUNCTION streamflow_restore_live_key(text) TO PUBLIC")
        assert bootstrap.ensure_schema(conn) == []
    with caplog.at_level(logging.WARNING):
        ok(run_flow(db_url, months / "month_000", AS_OF["month_000"]))
    assert "applied again" not in caplog.text
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT streamflow_schema_version()").fetchone() == (newer,)


def test_the_grants_check_names_every_function_db_init_runs_with_its_owners_rights(db_url):
    """control.sql's grants_not_db_init lists the functions 001 creates SECURITY DEFINER:
    one added to 001 and not there would go unchecked after a restore."""
    listed = re.findall(
        r"\('(streamflow_\w+\([^)]*\))'\)", (REPO / "db" / "sql" / "control.sql").read_text()
    )
    with psycopg.connect(db_url) as conn:
        defined = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p "
            "WHERE p.prosecdef AND p.pronamespace = 'public'::regnamespace"
        ).fetchall()
    assert sorted(name.replace(", ", ",") for name in listed) == sorted(d for (d,) in defined)
