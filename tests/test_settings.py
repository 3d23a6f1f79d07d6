"""Configuration: one place, environment first; an empty variable means its default."""

from __future__ import annotations

import pytest
from streamflow.settings import APP_DIR, load_settings


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
