"""The README against the code it describes."""

from __future__ import annotations

import re

from conftest import REPO as ROOT


def test_the_readmes_layout_names_every_module_of_the_package():
    """The README's Layout is the code map: a module added, renamed or removed without
    it sends readers looking for code that moved."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(
        line for line in readme.splitlines() if line.startswith("| `services/prefect/streamflow/`")
    )
    named = set(re.findall(r"`(\w+)`", row))
    package = ROOT / "services" / "prefect" / "streamflow"
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    assert sorted(modules - named) == [], "modules missing from the README's Layout"
    assert sorted(named - modules) == [], "the README's Layout names modules that do not exist"
