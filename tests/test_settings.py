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


def test_the_run_parameters_may_come_from_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """.env.example lists SEED_DIR, AS_OF and REPLACE with the other settings: a .env
    that sets them is a complete command, as the environment is."""
    for name in ("SEED_DIR", "AS_OF", "REPLACE"):
        # Set, then removed: the undo then removes what .env will have set (a bare
        # delenv of an absent name records nothing, and REPLACE=1 would outlive the test).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("SEED_DIR=months/month_001\nAS_OF=2024-02-29\nREPLACE=1\n")
    monkeypatch.chdir(tmp_path)

    args = complete_run([])

    assert args is not None
    assert (args.seed_dir, args.as_of, args.replace) == ("months/month_001", "2024-02-29", True)
    # The command line still wins over .env.
    assert complete_run(["--as-of", "2024-03-31"]).as_of == "2024-03-31"  # type: ignore[union-attr]


def test_the_dotenv_test_left_nothing_behind():
    """Runs after the test above (same module, same process): no REPLACE=1 for the rest."""
    assert not {"SEED_DIR", "AS_OF", "REPLACE"} & set(os.environ)


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
