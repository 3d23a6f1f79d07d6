"""Configuration: one place, environment first; an empty variable means its default."""

from __future__ import annotations

import os

import pytest
from streamflow.errors import InputError
from streamflow.inputs import cli_parser, complete_run
from streamflow.settings import APP_DIR, flag, load_settings


def test_empty_variables_mean_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """``GX_DOCS_DIR=`` (as an .env line left blank) must not write Data Docs into the
    working directory, nor an empty STREAMFLOW_PGDATA put a database there."""
    monkeypatch.chdir(tmp_path)
    for name in ("GX_DOCS_DIR", "STREAMFLOW_PGDATA", "LOCK_WAIT_SECONDS"):
        monkeypatch.setenv(name, "")

    settings = load_settings()

    assert settings.gx_docs_dir == (APP_DIR / "var" / "gx_docs").resolve()
    assert settings.embedded_pgdata == (APP_DIR / ".pgdata").resolve()
    assert settings.lock_wait_seconds == 600


def test_set_variables_win(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("GX_DOCS_DIR", str(tmp_path / "docs"))
    monkeypatch.setenv("LOCK_WAIT_SECONDS", "5")

    settings = load_settings()

    assert settings.gx_docs_dir == tmp_path / "docs"
    assert settings.lock_wait_seconds == 5


@pytest.mark.parametrize("value", ["abc", "-5", "nan"])
def test_an_unusable_setting_is_named(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("LOCK_WAIT_SECONDS", value)

    with pytest.raises(InputError) as err:
        load_settings()

    assert str(err.value) == (
        f"LOCK_WAIT_SECONDS {value!r} is not a number of seconds (e.g. LOCK_WAIT_SECONDS=600)"
    )


def test_the_users_drop_limit_is_a_percentage(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MAX_USERS_DROP_PERCENT", "")
    assert load_settings().max_users_drop_percent == 50
    monkeypatch.setenv("MAX_USERS_DROP_PERCENT", " 12.5% ")
    assert load_settings().max_users_drop_percent == 12.5
    for value in ("abc", "-1", "101", "nan", "0.5x"):
        monkeypatch.setenv("MAX_USERS_DROP_PERCENT", value)
        with pytest.raises(InputError) as err:
            load_settings()
        assert str(err.value) == (
            f"MAX_USERS_DROP_PERCENT {value!r} is not a percentage from 0 to 100 "
            "(e.g. MAX_USERS_DROP_PERCENT=50)"
        )


def test_the_run_parameters_may_come_from_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """.env.example lists SEED_DIR, AS_OF, REPLACE, ALLOW_GAP and ALLOW_DROP with the
    other settings: a .env that sets them is a complete command, as the environment is."""
    for name in ("SEED_DIR", "AS_OF", "REPLACE", "ALLOW_GAP", "ALLOW_DROP"):
        # Set, then removed: the undo then removes what .env will have set (a bare
        # delenv of an absent name records nothing, and REPLACE=1 would outlive the test).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text(
        "SEED_DIR=months/month_001\nAS_OF=2024-02-29\nREPLACE=1\nALLOW_GAP=yes\nALLOW_DROP=on\n"
    )
    monkeypatch.chdir(tmp_path)

    args = complete_run([])

    assert args is not None
    assert (args.seed_dir, args.as_of, args.replace, args.allow_gap, args.allow_drop) == (
        "months/month_001",
        "2024-02-29",
        True,
        True,
        True,
    )
    # The command line still wins over .env.
    assert complete_run(["--as-of", "2024-03-31"]).as_of == "2024-03-31"  # type: ignore[union-attr]


def test_the_dotenv_test_left_nothing_behind():
    """Runs after the test above (same module, same process): no REPLACE=1 for the rest."""
    assert not {"SEED_DIR", "AS_OF", "REPLACE", "ALLOW_GAP", "ALLOW_DROP"} & set(os.environ)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("YES", True),
        (" on ", True),
        ("y", True),
        ("", False),
        ("0", False),
        ("No", False),
        ("off", False),
    ],
)
def test_a_yes_no_setting_reads_the_usual_spellings(raw: str, expected: bool):
    assert flag("REPLACE", {"REPLACE": raw}) is expected


def test_a_yes_no_setting_refuses_anything_else():
    """REPLACE=maybe must not quietly mean "no": the run would be refused and tell the
    user to set the REPLACE they believe they set."""
    with pytest.raises(InputError, match=r"^REPLACE 'maybe' is neither yes nor no \(1/true"):
        flag("REPLACE", {"REPLACE": "maybe"})


def test_a_bad_replace_stops_only_a_run_that_reads_it(monkeypatch: pytest.MonkeyPatch):
    """serve and --help never use REPLACE, and --replace overrides it: a stray
    REPLACE=maybe in .env must not stop them."""
    monkeypatch.setenv("REPLACE", "maybe")
    month = ["--seed-dir", "months/month_001", "--as-of", "2024-02-29"]

    assert complete_run(["serve"]) is None
    assert complete_run([*month, "--help"]) is None
    assert cli_parser(None).parse_args(["serve"]).command == "serve"
    assert complete_run([*month, "--replace"]).replace is True  # type: ignore[union-attr]
    with pytest.raises(InputError, match="REPLACE 'maybe'"):
        complete_run(month)


SECRET = "p@ss:w/rd%$#x ' \\ ${HOME}"


def test_postgres_variables_reach_the_server_as_written(pg_admin_url: str):
    """A socket folder or an IPv6 address as POSTGRES_HOST, a password with URL
    characters: the flow's connections and GX's reach the server they name."""
    import sqlalchemy
    from psycopg.conninfo import conninfo_to_dict
    from streamflow import db
    from streamflow.settings import database_url_from_env
    from streamflow.validation import _sqlalchemy_url

    server = conninfo_to_dict(pg_admin_url)
    env = {
        "POSTGRES_HOST": server.get("host", "localhost"),
        "POSTGRES_PORT": str(server.get("port") or 5432),
        "POSTGRES_USER": server["user"],
        "POSTGRES_PASSWORD": server.get("password") or SECRET,
        "POSTGRES_DB": server.get("dbname", "postgres"),
    }

    url = database_url_from_env(env)

    assert conninfo_to_dict(url)["password"] == env["POSTGRES_PASSWORD"]
    with db.connect(url) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == (env["POSTGRES_USER"], env["POSTGRES_DB"])
    gx_url = _sqlalchemy_url(url)
    assert "$" not in gx_url  # nothing for GX's ${VAR} substitution to read
    engine = sqlalchemy.create_engine(gx_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == row[1]
        assert conn.execute(sqlalchemy.text("SHOW DateStyle")).scalar() == "ISO, YMD"
    engine.dispose()
    # libpq's form of what the URL used to mangle
    ipv6 = conninfo_to_dict(database_url_from_env({**env, "POSTGRES_HOST": "::1"}))
    assert (ipv6["host"], ipv6["port"], ipv6["dbname"]) == ("::1", env["POSTGRES_PORT"], row[1])


@pytest.mark.parametrize("value", ["abc", "0", "70000", "54 32", "-1"])
def test_a_bad_postgres_port_is_named(value: str):
    from streamflow.settings import database_url_from_env

    with pytest.raises(InputError) as err:
        database_url_from_env({"POSTGRES_HOST": "db", "POSTGRES_PORT": value})

    assert str(err.value) == f"POSTGRES_PORT {value!r} is not a port number (1-65535, e.g. 5432)"


def test_blank_connection_variables_are_unset():
    """' ' is no server: the embedded one is used, not libpq's defaults (PGHOST...)."""
    from streamflow.settings import database_url_from_env

    assert database_url_from_env({"DATABASE_URL": " ", "POSTGRES_HOST": " \t"}) is None
    url = database_url_from_env({"DATABASE_URL": " host=db dbname=x\n"})
    assert url == "host=db dbname=x"
    # The user and database too (code review: they were kept padded, ' ingest ' a
    # role no one has); the password is taken as written.
    url = database_url_from_env(
        {
            "POSTGRES_HOST": "db",
            "POSTGRES_USER": " ingest ",
            "POSTGRES_DB": "streamflow\n",
            "POSTGRES_PASSWORD": " pw ",
        }
    )
    assert url == "host=db port=5432 user=ingest password=' pw ' dbname=streamflow"


def test_gx_connects_with_the_urls_options_and_one_port_per_host():
    """What SQLAlchemy hands psycopg for GX: the URL's options then the pipeline's, and
    libpq's one port for several hosts spelled once per host (SQLAlchemy refused it)."""
    import sqlalchemy
    from streamflow.validation import _sqlalchemy_url

    url = sqlalchemy.engine.make_url(
        _sqlalchemy_url("host=h1,h2 port=5433 dbname=d user=u options='-c lock_timeout=7min'")
    )
    args = sqlalchemy.create_engine(url).dialect.create_connect_args(url)[1]

    assert (
        args["options"]
        == "-c lock_timeout=7min -c work_mem=256MB -c client_connection_check_interval=1s "
        "-c DateStyle=ISO,YMD -c search_path=public"
    )
    assert (args["host"], args["port"], args["dbname"]) == ("h1,h2", "5433,5433", "d")
    assert args["connect_timeout"] == "15"  # db.connect's default, not psycopg's 130 s


def test_pgoptions_is_kept_when_the_url_has_no_options(monkeypatch: pytest.MonkeyPatch):
    """libpq reads PGOPTIONS only when no options are given, and the pipeline gives some."""
    from streamflow.db import session_options

    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=1234")

    assert (
        session_options("host=h")
        == "-c statement_timeout=1234 -c DateStyle=ISO,YMD -c search_path=public"
    )
    assert (
        session_options("host=h options='-c a=b'")
        == "-c a=b -c DateStyle=ISO,YMD -c search_path=public"
    )


# libpq's own variables, read where the connection is made to say what libpq will do;
# the process environment handed on to a child (the embedded server's PGPORT, pinned
# while it starts); telemetry switched off for Prefect and GX.
_NOT_CONFIGURATION = {
    "db.py": {"PGOPTIONS", "PGCONNECT_TIMEOUT", "PGHOST", "PGPORT"},
    "diagnosis.py": {"variable"},  # one of PGDATESTYLE, PGTZ, PGGEQO
    "embedded.py": {"PGPORT"},
    "validation.py": {"GX_ANALYTICS_ENABLED", "URL_ENV"},
    "ingest_flow.py": {"PREFECT_SERVER_ANALYTICS_ENABLED"},
}


def test_the_pipelines_variables_are_read_in_settings_only():
    """One place for configuration: no module of the flow but settings.py reads an
    environment variable, except libpq's own, a child's environment and telemetry
    switches. (That .env.example documents each variable the flow reads is
    tests/test_static_stack.py's.)"""
    import re

    from conftest import FLOW_DIR as flow_dir

    read = re.compile(
        r"""os\.(?:environ\.get|environ\.setdefault|getenv)\(\s*["']?(\w+)|os\.environ\[["']?(\w+)"""
    )
    found = {}
    for path in [*sorted((flow_dir / "streamflow").glob("*.py")), flow_dir / "ingest_flow.py"]:
        if path.name == "settings.py":
            continue
        names = {a or b for a, b in read.findall(path.read_text(encoding="utf-8"))}
        if names - _NOT_CONFIGURATION.get(path.name, set()):
            found[path.name] = sorted(names)
    assert found == {}
