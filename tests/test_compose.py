"""Checks docker-compose.yml and the Dockerfile against the code they run.

Docker is not needed: the compose file is parsed as YAML and each piece is compared
with the real ``Settings`` fields, the real ``radq`` CLI (the click command tree that
typer builds) and the real FastAPI routes, so renaming a setting, a command or an option
without updating the deployment files fails here.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import typer.main
import yaml

import radq.cli
from radq.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

REQUIRED_SERVICES = {"redis", "postgres", "migrate", "api", "worker", "worker-gpu", "scp", "flower", "minio"}
RADQ_SERVICES = ("migrate", "api", "worker", "worker-gpu", "scp", "flower")
"""Services that run the radq image, with a ``radq ...`` command."""
WORKERS = ("worker", "worker-gpu")
ONE_SHOT = {"migrate"}
"""Services that run to completion; every other one is long-running and needs a healthcheck."""
SAMPLE_ENV = {"RADQ_FLOWER_BASIC_AUTH": "ops:secret", "MINIO_ROOT_PASSWORD": "minio-secret"}
"""What an operator puts in .env for the variables compose requires."""
VALID_CONDITIONS = {"service_healthy", "service_completed_successfully"}
TORCH_PIN = "torch==2.13.0"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in compose"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# Recent typer vendors its own click (typer._click), so the command tree is inspected
# by its click interface (``commands``, ``params``, ``make_context``), not isinstance.
@pytest.fixture(scope="module")
def cli() -> Any:
    group = typer.main.get_command(radq.cli.app)
    assert isinstance(getattr(group, "commands", None), dict), "radq.cli.app is not a command group"
    return group


def _is_group(command: Any) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def _interpolated(value: str) -> str:
    """``value`` as compose would expand it with :data:`SAMPLE_ENV` as the host environment."""

    def expand(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if name in SAMPLE_ENV:
            return SAMPLE_ENV[name]
        assert kind != "?", f"${{{name}}} is required by compose; add a sample to SAMPLE_ENV"
        return rest or ""

    return _INTERPOLATION.sub(expand, value)


def _argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "no command"
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _resolve(cli: Any, argv: list[str]) -> tuple[list[str], Any, list[str]]:
    """Walk ``radq <group>... <command> args`` down the click tree.

    Returns the command path, the leaf command and the remaining arguments.
    """
    assert argv[0] == "radq", f"command {argv} does not start with radq"
    path, command, rest = ["radq"], cli, argv[1:]
    while _is_group(command):
        assert rest, f"{' '.join(path)} needs a subcommand; it has {sorted(command.commands)}"
        name, rest = rest[0], rest[1:]
        assert name in command.commands, (
            f"`{' '.join(path)} {name}` is not a command; {' '.join(path)} has {sorted(command.commands)}"
        )
        path.append(name)
        command = command.commands[name]
    return path, command, rest


def _options(command: Any) -> set[str]:
    return {
        opt
        for param in command.params
        if param.param_type_name == "option"
        for opt in (*param.opts, *param.secondary_opts)
    }


def _option_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    mounts = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        mounts.append((source, target))
    return mounts


def _volume_holding(service: dict[str, Any], path: str) -> tuple[str, str]:
    """The mount whose target contains ``path`` (the deepest one)."""
    holding = [
        (source, target)
        for source, target in _mounts(service)
        if PurePosixPath(target) in (PurePosixPath(path), *PurePosixPath(path).parents)
    ]
    assert holding, f"nothing mounted over {path}; mounts are {_mounts(service)}"
    return max(holding, key=lambda m: len(PurePosixPath(m[1]).parts))


# --- services -------------------------------------------------------------------------------


def test_required_services_exist(services: dict[str, Any]) -> None:
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"compose lacks services {sorted(missing)}"


def test_migrate_is_one_shot(services: dict[str, Any]) -> None:
    # An unquoted `no` is YAML for false; compose wants the string.
    assert services["migrate"].get("restart", "no") == "no"


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a container_name prevents --scale worker=N"
    assert not worker.get("ports"), "published ports prevent --scale worker=N"


# --- settings -------------------------------------------------------------------------------


def test_every_radq_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    known = {"RADQ_" + name.upper() for name in Settings.model_fields}
    sources: dict[str, dict[str, str]] = {
        f"services.{name}": _env(service) for name, service in compose["services"].items()
    }
    for key, value in compose.items():
        if key.startswith("x-") and isinstance(value, dict):
            sources[key] = {str(k): str(v) for k, v in value.items()}
    used = {(where, var) for where, env in sources.items() for var in env if var.startswith("RADQ_")}
    assert used, "compose sets no RADQ_* variable"
    unknown = sorted(f"{where}: {var}" for where, var in used if var not in known)
    assert not unknown, f"not Settings fields: {unknown}; known: {sorted(known)}"


def test_radq_services_get_database_and_broker(services: dict[str, Any]) -> None:
    for name in RADQ_SERVICES:
        env = _env(services[name])
        for var in ("RADQ_DATABASE_URL", "RADQ_BROKER_URL"):
            assert env.get(var), f"{name} has no {var}"


def test_compose_environment_builds_valid_settings(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("RADQ_")]:
        monkeypatch.delenv(var)
    for name in RADQ_SERVICES:
        with monkeypatch.context() as m:
            for var, value in _env(services[name]).items():
                m.setenv(var, _interpolated(value))
            settings = Settings()
            assert settings.resolved_database_url.startswith("postgresql+psycopg://"), name
            env = _env(services[name])
            if "RADQ_BLOB_DIR" in env:
                assert settings.blob_dir == Path(env["RADQ_BLOB_DIR"]), name


# --- commands -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RADQ_SERVICES)
def test_command_is_a_real_cli_command(name: str, services: dict[str, Any], cli: Any) -> None:
    argv = _argv(services[name])
    path, command, rest = _resolve(cli, argv)
    options = _options(command)
    for arg in rest:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert option in options, (
                f"{name}: `{' '.join(path)}` has no option {option}; it has {sorted(options)}"
            )
    # Let click parse it too: catches bad values (e.g. a non-integer port) and stray arguments.
    command.make_context(" ".join(path), list(rest))


def test_expected_commands(services: dict[str, Any], cli: Any) -> None:
    expected = {
        "migrate": ["radq", "db", "upgrade"],
        "api": ["radq", "api"],
        "worker": ["radq", "worker"],
        "worker-gpu": ["radq", "worker"],
        "scp": ["radq", "scp"],
        "flower": ["radq", "flower"],
    }
    for name, path in expected.items():
        assert _resolve(cli, _argv(services[name]))[0] == path, name


def test_dockerfile_cmd_is_a_real_cli_command(cli: Any) -> None:
    match = re.search(r"^CMD\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile has no exec-form CMD"
    argv = yaml.safe_load(match.group(1))
    path, command, rest = _resolve(cli, argv)
    assert path == ["radq", "api"]
    command.make_context(" ".join(path), list(rest))
    assert _option_value(rest, "--host") == "0.0.0.0"


# --- api: port and healthcheck --------------------------------------------------------------


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    published = {}
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published[int(entry["target"])] = int(entry.get("published", entry["target"]))
        else:
            parts = str(entry).split("/")[0].split(":")
            published[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return published


def _port_in_command(service: dict[str, Any], default: int) -> int:
    value = _option_value(_argv(service), "--port")
    return int(value) if value is not None else default


def test_api_port_is_published(services: dict[str, Any], cli: Any) -> None:
    api = services["api"]
    port = _port_in_command(api, _default(cli.commands["api"], "port"))
    assert _option_value(_argv(api), "--host") == "0.0.0.0", "api must bind all interfaces in a container"
    assert port in _published(api), f"api listens on {port} but publishes {_published(api)}"
    assert _published(api)[port] == port


def test_flower_port_is_published(services: dict[str, Any], cli: Any) -> None:
    flower = services["flower"]
    port = _port_in_command(flower, _default(cli.commands["flower"], "port"))
    assert _option_value(_argv(flower), "--address") == "0.0.0.0"
    assert port in _published(flower), f"flower listens on {port} but publishes {_published(flower)}"


def _default(command: Any, param_name: str) -> Any:
    defaults = {p.name: p.default for p in command.params}
    assert param_name in defaults, f"`{command.name}` has no {param_name}; it has {sorted(defaults)}"
    return defaults[param_name]


def test_api_healthcheck_hits_a_real_route(
    services: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api.app import create_app

    api = services["api"]
    test = api["healthcheck"]["test"]
    text = " ".join(test) if isinstance(test, list) else str(test)
    assert "curl" not in text and "wget" not in text, "python:3.11-slim has neither curl nor wget"
    urls = re.findall(r"https?://[^\s'\"]+", text)
    assert len(urls) == 1, f"expected one URL in the api healthcheck: {text}"
    match = re.fullmatch(r"https?://(127\.0\.0\.1|localhost):(\d+)(/[^?#]*)", urls[0])
    assert match, f"healthcheck URL {urls[0]} is not a local http://host:port/path"
    assert int(match.group(2)) == _port_in_command(api, 8000), "healthcheck port differs from --port"

    for var in [v for v in os.environ if v.startswith("RADQ_")]:
        monkeypatch.delenv(var)
    app = create_app(Settings(home=tmp_path))
    paths = _route_paths(app.routes) | set(app.openapi()["paths"])
    assert match.group(3) in paths, f"{match.group(3)} is not an API route; routes: {sorted(paths)}"


def _route_paths(routes: list[Any], prefix: str = "") -> set[str]:
    """Paths of ``app.routes``, descending into mounts and included routers.

    Recent FastAPI keeps an included router as one lazy entry (with ``original_router``)
    instead of copying its routes into the app.
    """
    paths: set[str] = set()
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            paths |= _route_paths(included.routes, prefix + getattr(context, "prefix", ""))
        elif getattr(route, "routes", None):
            paths |= _route_paths(route.routes, prefix + getattr(route, "path", ""))
        elif isinstance(getattr(route, "path", None), str):
            paths.add(prefix + route.path)
    return paths


# --- depends_on and healthchecks ------------------------------------------------------------


def test_depends_on_uses_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on")
        if depends is None:
            continue
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = (spec or {}).get("condition")
            assert condition in VALID_CONDITIONS, f"{name} -> {target}: condition {condition!r}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} healthy; it has none"


def test_startup_order(services: dict[str, Any]) -> None:
    def condition(name: str, target: str) -> str | None:
        return ((services[name].get("depends_on") or {}).get(target) or {}).get("condition")

    assert condition("migrate", "postgres") == "service_healthy"
    for name in ("api", "worker", "worker-gpu", "scp"):
        assert condition(name, "migrate") == "service_completed_successfully", name
        assert condition(name, "redis") == "service_healthy", name
    assert condition("flower", "redis") == "service_healthy"


# --- shared blob volume ---------------------------------------------------------------------


def test_api_and_worker_share_the_blob_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    held = {}
    for name in ("api", "worker"):
        env = _env(services[name])
        blob_dir = env.get("RADQ_BLOB_DIR") or str(PurePosixPath(env["RADQ_HOME"]) / "blobs")
        assert PurePosixPath(blob_dir).is_absolute(), f"{name}: RADQ_BLOB_DIR {blob_dir} is relative"
        held[name] = (blob_dir, _volume_holding(services[name], blob_dir))
    (api_dir, (api_src, api_target)), (worker_dir, (worker_src, worker_target)) = held["api"], held["worker"]
    assert api_dir == worker_dir, "api and worker disagree on RADQ_BLOB_DIR"
    assert api_src == worker_src and api_target == worker_target, (
        f"api mounts {api_src}:{api_target}, worker {worker_src}:{worker_target}"
    )
    assert api_src in (compose.get("volumes") or {}), f"{api_src} is not a declared named volume"


def test_allowed_roots_are_mounted(services: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        env = _env(services[name])
        for root in filter(None, env.get("RADQ_ALLOWED_ROOTS", "").split(os.pathsep)):
            _volume_holding(services[name], root)


# --- Dockerfile -----------------------------------------------------------------------------


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE))


def test_dockerfile_installs_pinned_cpu_torch_first() -> None:
    text = DOCKERFILE.read_text()
    torch_install = re.search(r"pip install\s+(?:[^\n\\]*\s)?(torch[^\s]*)\s+[^\n]*", text)
    assert torch_install, "Dockerfile does not pip install torch"
    assert torch_install.group(1) == TORCH_PIN, f"Dockerfile installs {torch_install.group(1)}"
    index = re.search(r"--index-url\s+(\S+)", torch_install.group(0))
    assert index, "torch is not installed from an explicit index"
    url = re.sub(r"\$\{?(\w+)\}?", lambda m: _dockerfile_args().get(m.group(1), m.group(0)), index.group(1))
    assert url == "https://download.pytorch.org/whl/cpu", f"the default image installs torch from {url}"
    project_install = re.search(
        r"pip install\s+'?(?:\.|/[^\s'\[]*radq[^\s'\[]*)(\[[\w,-]+\])?'?\s*$", text, re.MULTILINE
    )
    assert project_install, "Dockerfile does not pip install the project"
    assert "s3" in (project_install.group(1) or ""), "the image needs the s3 extra (RADQ_BLOB_URL=s3://)"
    assert torch_install.start() < project_install.start(), "torch must be installed before the project"
    # The same exact pin as pyproject, or `pip install .` would replace the CPU wheel.
    assert f'"{TORCH_PIN}"' in PYPROJECT.read_text()


def test_dockerfile_runs_as_non_root() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^WORKDIR\s+/app\s*$", DOCKERFILE.read_text(), re.MULTILINE)


def test_dockerfile_exposes_the_ports_compose_uses(services: dict[str, Any]) -> None:
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
               for p in line.split()}  # fmt: skip
    for name in ("api", "flower", "scp"):
        port = _option_value(_argv(services[name]), "--port")
        assert port is not None and int(port) in exposed, f"{name} port {port} not in EXPOSE {exposed}"
    assert int(_env(services["worker"])["RADQ_WORKER_METRICS_PORT"]) in exposed


# --- healthchecks of long-running services --------------------------------------------------


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] != "NONE", f"{name} disables its healthcheck"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_healthcheck_asks_for_this_workers_heartbeat(
    name: str, services: dict[str, Any], cli: Any
) -> None:
    worker = services[name]
    test = worker["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", f"{name}: exec-form healthcheck expected"
    path, command, rest = _resolve(cli, [str(t) for t in test[1:]])
    assert path == ["radq", "worker-health"], f"{name}: healthcheck runs {path}"
    command.make_context(" ".join(path), list(rest))
    # Both sides default to celery@<container hostname>; a --hostname must be the same on both.
    assert _option_value(rest, "--hostname") == _option_value(_argv(worker), "--hostname"), name


def test_flower_healthcheck_hits_a_flower_route(services: dict[str, Any], cli: Any) -> None:
    from flower.urls import handlers

    flower = services["flower"]
    urls = re.findall(r"https?://[^\s'\"]+", _healthcheck_text(flower))
    assert len(urls) == 1, _healthcheck_text(flower)
    match = re.fullmatch(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[^?#]*)", urls[0])
    assert match, urls[0]
    assert int(match.group(1)) == _port_in_command(flower, _default(cli.commands["flower"], "port"))
    # Tornado serves the first matching route; Flower's last one is a catch-all 404.
    specs = [(h.regex.pattern, h.handler_class) if hasattr(h, "regex") else (h[0], h[1]) for h in handlers]
    handler = next(cls for pattern, cls in specs if re.fullmatch(pattern.rstrip("$"), match.group(2)))
    assert "NotFound" not in handler.__name__, f"{match.group(2)} is not a Flower route"


def test_scp_healthcheck_connects_to_its_port(services: dict[str, Any], cli: Any) -> None:
    scp = services["scp"]
    port = _port_in_command(scp, _default(cli.commands["scp"], "port"))
    assert _option_value(_argv(scp), "--host") == "0.0.0.0"
    assert port in _published(scp), f"scp listens on {port} but publishes {_published(scp)}"
    assert re.search(rf"\(\s*'127\.0\.0\.1'\s*,\s*{port}\s*\)", _healthcheck_text(scp)), (
        f"scp healthcheck does not connect to port {port}: {_healthcheck_text(scp)}"
    )


# --- workers: metrics, GPU profile ----------------------------------------------------------


@pytest.mark.parametrize("name", WORKERS)
def test_worker_metrics_port_is_exposed_inside_the_network(name: str, services: dict[str, Any]) -> None:
    worker = services[name]
    port = Settings(worker_metrics_port=_env(worker)["RADQ_WORKER_METRICS_PORT"]).worker_metrics_port  # type: ignore[arg-type]
    assert port > 0, f"{name}: RADQ_WORKER_METRICS_PORT=0 turns metrics off"
    assert port in {int(str(p).split("/")[0]) for p in worker.get("expose") or []}, (
        f"{name} does not expose {port}"
    )
    assert not worker.get("ports"), f"{name}: published ports prevent --scale"


def test_gpu_worker_is_optional_and_reserves_a_gpu(services: dict[str, Any]) -> None:
    gpu, cpu = services["worker-gpu"], services["worker"]
    assert "gpu" in (gpu.get("profiles") or []), "worker-gpu must be in the gpu profile"
    assert not cpu.get("profiles"), "the CPU worker must start with a plain `docker compose up`"
    assert Settings(device=_env(gpu)["RADQ_DEVICE"]).device.startswith("cuda")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    build = gpu.get("build") or {}
    assert isinstance(build, dict), "worker-gpu must build with CUDA torch wheels"
    index = (build.get("args") or {}).get("TORCH_INDEX", "")
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert "TORCH_INDEX" in _dockerfile_args(), "the Dockerfile takes no TORCH_INDEX build argument"
    assert gpu.get("image") != cpu.get("image"), "the CUDA image must not overwrite the CPU one"


def test_minio_is_optional(services: dict[str, Any]) -> None:
    assert "s3" in (services["minio"].get("profiles") or [])


# --- flower: auth and state -----------------------------------------------------------------


def test_flower_auth_comes_from_the_environment(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert _option_value(_argv(flower), "--basic-auth") is None, "a password in the command is in the file"
    value = _env(flower).get("RADQ_FLOWER_BASIC_AUTH", "")
    assert re.fullmatch(r"\$\{RADQ_FLOWER_BASIC_AUTH:\?[^}]*\}", value), (
        f"RADQ_FLOWER_BASIC_AUTH must come from the host environment, required: {value!r}"
    )


def test_flower_state_is_on_a_named_volume(
    compose: dict[str, Any], services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("RADQ_")]:
        monkeypatch.delenv(var)
    flower = services["flower"]
    for var, value in _env(flower).items():
        monkeypatch.setenv(var, _interpolated(value))
    db = Settings().resolved_flower_db
    source, _ = _volume_holding(flower, str(db))
    assert source in (compose.get("volumes") or {}), f"flower state {db} is on {source}, not a named volume"
    assert source != "blobs", "flower state must not share the blob volume"
