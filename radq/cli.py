"""The ``radq`` command line: run the services, submit work, read results."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from radq.client import ApiError, Client
from radq.errors import RadqError
from radq.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

EXIT_FAILED = 1
"""A command could not do what was asked (API error, bad input)."""
EXIT_USAGE = 2
"""The options cannot work together (e.g. a CPU worker told to take GPU-only queues)."""
EXIT_TIMEOUT = 3
"""``--wait`` gave up before the job ended."""
FLOWER_SAVE_EVERY_MS = 60_000
"""How often Flower writes its state file, so a crash loses at most this much history."""

app = typer.Typer(help="radq: bulk CNN inference over DICOM archives.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
models_app = typer.Typer(help="Model directories.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (written to the database directly).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(tokens_app, name="tokens")
console = Console()
err = Console(stderr=True)


def _settings(**overrides: object) -> Settings:
    settings = Settings()
    return settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _deployable(settings: Settings, command: str) -> Settings:
    """``settings``, after refusing development-only settings in production (see radq.deployment)."""
    from radq.deployment import ensure_deployable

    try:
        ensure_deployable(settings, command)
    except RadqError as exc:
        raise _fail(str(exc)) from None
    return settings


def _logging(level: str, settings: Settings) -> None:
    from radq.logs import configure_logging

    configure_logging(level, settings.log_format)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the HTTP API (FastAPI under uvicorn; OpenAPI at /docs)."""
    import uvicorn

    from api.app import create_app

    settings = _deployable(_settings(), "api")
    _logging(log_level, settings)
    # In JSON mode uvicorn's loggers propagate to radq's handler instead of their own.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=log_level.lower(), log_config=log_config
    )


@app.command()
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(
            help="Messages processed at once, more while they are small (up to RADQ_WORKER_MAX_MESSAGES); "
            "their instances share batches (RADQ_WORKER_CONCURRENCY, 2)."
        ),
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues (default: RADQ_QUEUE, the device class, and model.<name> for "
            "every model in RADQ_MODEL_DIR this device can run)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (RADQ_DEVICE).")] = None,
    hostname: Annotated[
        str | None, typer.Option(help="Worker name, %h: this host (default celery@<host>).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run a worker process: decode processes, one model runner, one result writer.

    Run one per GPU (RADQ_DEVICE=cuda:N), or one per CPU host: it uses every core it
    may run on, for decoding and for torch. A CPU worker refuses queues that carry work
    for GPU-only models (exit 2).
    """
    from celery.utils.nodenames import default_nodename, host_format

    from radq.logs import set_worker_name
    from radq.model_card import cards_in
    from radq.routing import DeviceClass, check_worker_queues, worker_queues
    from workers.app import create_worker_app, pool_threads
    from workers.device import resolve_device

    settings = _deployable(_settings(device=device), "worker")
    # Celery's own default (celery@<host>), resolved now so every log line names the worker.
    hostname = host_format(default_nodename(hostname))
    set_worker_name(hostname)
    _logging(log_level, settings)
    cards = cards_in(settings.model_dir)
    try:
        device_class: DeviceClass = "gpu" if resolve_device(settings.device).type == "cuda" else "cpu"
        chosen = (
            [q.strip() for q in queues.split(",") if q.strip()]
            if queues is not None
            else worker_queues(settings, device_class, cards)
        )
        check_worker_queues(settings, device_class, chosen, cards)
    except RadqError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    logging.getLogger("radq.worker").info(
        "device %s (%s), models in %s: %s; taking queues %s",
        settings.device, device_class, settings.model_dir, ", ".join(sorted(cards)) or "none",
        ",".join(chosen),
    )  # fmt: skip
    if concurrency:
        settings = settings.model_copy(update={"worker_concurrency": concurrency})
    celery_app = create_worker_app(settings)
    argv = [
        # Celery prints its banner straight to stdout; a JSON log keeps one object per line.
        *(["--quiet"] if settings.log_format == "json" else []),
        "worker",
        # A thread per message it may hold; the prefetch count (workers.prefetch) says how many.
        f"--concurrency={pool_threads(settings)}",
        f"--queues={','.join(chosen)}",
        # Threads, not prefork: every message in flight feeds the one engine of this
        # process (batches across messages); decoding runs in the engine's processes.
        "--pool=threads",
        f"--loglevel={log_level.upper()}",
        # No --task-events: three events per message cost a one-file message ~10 % of the
        # worker's CPU with nobody listening; `radq flower` turns them on while it runs.
        "--without-gossip",
        "--without-mingle",
        f"--hostname={hostname}",
    ]
    celery_app.worker_main(argv)


@app.command("worker-health")
def worker_health(
    hostname: Annotated[
        str | None, typer.Option(help="The worker's name, %h: this host (default celery@<host>).")
    ] = None,
) -> None:
    """Exit 0 when the worker's heartbeat in Redis is live, 1 when not (container healthchecks)."""
    import redis
    from celery.utils.nodenames import default_nodename, host_format

    from radq.heartbeat import heartbeat_key

    name = host_format(default_nodename(hostname))
    try:
        client = redis.Redis.from_url(_settings().broker_url, socket_timeout=5, socket_connect_timeout=5)
        alive = bool(client.exists(heartbeat_key(name)))
    except redis.RedisError as exc:
        raise _fail(f"the broker is unreachable: {exc}") from None
    if not alive:
        raise _fail(f"no live heartbeat from worker {name}")
    console.print(f"worker {name} is alive")


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="TCP port of the Flower UI.")] = 5555,
    address: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    basic_auth: Annotated[
        str | None, typer.Option(help="user:password for the UI (default RADQ_FLOWER_BASIC_AUTH).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run Flower, the Celery monitoring UI, against radq's broker.

    Its state (tasks and workers seen) is kept in RADQ_FLOWER_DB across restarts. Workers
    send task events only when asked: Flower asks every 5 s (``--enable_events``), so
    workers started before or after it report their tasks within seconds.
    """
    from radq.queue import make_celery

    settings = _deployable(_settings(), "flower")
    settings.ensure_dirs()
    _logging(log_level, settings)
    db = settings.resolved_flower_db
    db.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        *(["--quiet"] if settings.log_format == "json" else []),
        "flower",
        f"--port={port}",
        f"--address={address}",
        "--persistent=True",
        f"--db={db}",
        f"--state_save_interval={FLOWER_SAVE_EVERY_MS}",
        "--enable_events=True",
        f"--logging={log_level.lower()}",
    ]
    auth = basic_auth or settings.flower_basic_auth
    if auth:
        argv.append(f"--basic-auth={auth}")
    make_celery(settings).start(argv=argv)


@app.command()
def scp(
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 11112,
    ae_title: Annotated[str, typer.Option(help="This SCP's AE title; senders must call it.")] = "RADQ",
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: all).")] = "127.0.0.1",
    group: Annotated[
        str, typer.Option(help="association: one job per association, when it ends; study: one per study.")
    ] = "association",
    quiet_seconds: Annotated[
        float | None,
        typer.Option(min=0.1, help="--group study: submit a study this long after its last instance."),
    ] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Model name (repeatable).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run a DICOM C-STORE SCP: what modalities and PACS send becomes radq jobs."""
    from scp.batching import Grouping
    from scp.server import ScpConfig, run_scp

    if group not in {g.value for g in Grouping}:
        raise _fail(f"--group must be association or study, not {group!r}", 2)
    settings = _deployable(_settings(scp_quiet_seconds=quiet_seconds), "scp")
    _logging(log_level, settings)
    if log_level.upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs every PDU at INFO
    config = ScpConfig(ae_title=ae_title, host=host, port=port, grouping=Grouping(group), models=model or [])
    try:
        code = run_scp(settings, config)
    except RadqError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def reconcile(
    grace: Annotated[
        float, typer.Option(help="Only instances queued at least this many seconds are compared with Redis.")
    ] = 30.0,
) -> None:
    """Re-queue what the database says is waiting but nothing is doing (after a Redis loss)."""
    from api.maintenance import publish_pending, reap
    from api.maintenance import reconcile as reconcile_broker
    from api.state import AppState

    state = AppState.build(_settings())
    try:
        published = publish_pending(state)
        reaped, failed = reap(state)
        missing = reconcile_broker(state, grace_seconds=grace)
    except RadqError as exc:
        raise _fail(str(exc)) from None
    finally:
        state.engine.dispose()
    console.print(
        f"published {published} never-queued instance(s); re-sent {reaped} whose worker was lost "
        f"({failed} failed after RADQ_MAX_LOST_LEASES); re-published {missing} that no message carried"
    )


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or migrate the schema (Alembic)."""
    from db.migrate import current, upgrade

    settings = _settings()
    settings.ensure_dirs()
    url = settings.resolved_database_url
    upgrade(url, revision)
    console.print(f"database at revision {current(url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision."""
    from db.migrate import current

    console.print(current(_settings().resolved_database_url) or "empty (run `radq db upgrade`)")


def _client() -> Client:
    settings = _settings()
    token = settings.api_token.get_secret_value() if settings.api_token else None
    return Client(settings.api_url, token=token)


def _report(client: Client, job: dict[str, object]) -> None:
    from radq.render import job_table, problems_table

    console.print(job_table(job))  # type: ignore[arg-type]
    job_id = str(job["id"])
    problems = client.instances(job_id, "failed") + client.instances(job_id, "skipped")
    if problems:
        console.print(problems_table(problems))


@app.command()
def submit(
    paths: Annotated[list[Path], typer.Argument(help="Files, folders (recursive), .zip/.tar(.gz) archives.")],
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
    model: Annotated[list[str] | None, typer.Option("--model", help="Model name (repeatable).")] = None,
    server_paths: Annotated[
        bool, typer.Option("--server-paths", help="Have the server read the paths in place, not uploads.")
    ] = False,
    explain: Annotated[
        float | None, typer.Option(help="Grad-CAM maps for labels scoring at least this (0-1).")
    ] = None,
    priority: Annotated[str | None, typer.Option(help="urgent, normal or bulk.")] = None,
    webhook: Annotated[str | None, typer.Option(help="URL POSTed the job summary when it ends.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Infer again instances already processed.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits.")] = 24 * 3600,
) -> None:
    """Submit DICOM for inference; prints the job id."""
    from radq.render import wait_for_job

    client = _client()
    try:
        if server_paths:
            options = {"priority": priority, "webhook_url": webhook, "force": force or None}
            job = client.submit_paths([str(p.resolve()) for p in paths], model or [], explain, **options)
        else:
            options = {"priority": priority, "webhook_url": webhook, "force": force or None}
            job = client.upload(paths, model or [], explain, **options)
        console.print(job["id"])
        if wait:
            job = wait_for_job(client, job["id"], console, timeout=timeout)
            _report(client, job)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    except TimeoutError as exc:
        raise _fail(str(exc), EXIT_TIMEOUT) from None
    except (RadqError, OSError) as exc:  # a local file unreadable, or changed while it was sent
        raise _fail(str(exc)) from None


@app.command()
def status(
    job_id: str,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
) -> None:
    """Show a job's state and its files without a result."""
    from radq.render import wait_for_job

    client = _client()
    try:
        job = wait_for_job(client, job_id, console, timeout=24 * 3600) if wait else client.job(job_id)
        _report(client, job)
    except ApiError as exc:
        raise _fail(str(exc)) from None


@app.command()
def results(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    format: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
) -> None:
    """Show a study's results per instance and model, with the study summary."""
    from radq.render import format_results

    if format not in ("table", "json", "csv"):
        raise _fail(f"--format must be table, json or csv, not {format!r}", 2)
    try:
        study = _client().study_results(study_uid)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    out = format_results(study, format)
    if isinstance(out, str):
        typer.echo(out, nl=not out.endswith("\n"))
    else:
        console.print(out)


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option(help="queued, running, done or cancelled.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601: jobs created at or after.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
) -> None:
    """List jobs with their progress, throughput and ETA."""
    from radq.render import jobs_table

    try:
        console.print(jobs_table(_client().jobs(status=status, since=since, limit=limit)))
    except ApiError as exc:
        raise _fail(str(exc)) from None


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job: waiting work is dropped, work in progress finishes."""
    try:
        job = _client().cancel(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(f"job {job['id']}: {job['status']}")


@app.command()
def retry(job_id: str) -> None:
    """Queue a job's failed instances again."""
    try:
        job = _client().retry(job_id)
    except ApiError as exc:
        raise _fail(str(exc)) from None
    console.print(f"job {job['id']}: {job['status']}, {job['counts']['queued']} instance(s) queued again")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="Who or what uses it; shown in the audit trail.")],
    scope: Annotated[str, typer.Option(help="read, submit (read + submit/cancel/retry) or admin.")],
) -> None:
    """Create an API token and print it, once: only its SHA-256 is stored."""
    from db.session import transaction
    from db.status import Scope
    from db.tokens import create_token

    if scope not in {s.value for s in Scope}:
        raise _fail(f"--scope must be read, submit or admin, not {scope!r}", 2)
    with _database() as sessions:
        try:
            with transaction(sessions) as session:
                token = create_token(session, name=name, scope=Scope(scope))
        except RadqError as exc:
            raise _fail(str(exc)) from None
    err.print(f"token {token.name!r} ({token.scope}) created; it is shown only now:")
    typer.echo(token.secret)


@tokens_app.command("list")
def tokens_list() -> None:
    """List tokens: name, scope, the first characters, created, revoked."""
    from rich.table import Table

    from db.jobs import as_utc
    from db.tokens import list_tokens

    with _database() as sessions, sessions() as session:
        tokens = list_tokens(session)
    table = Table(title="API tokens")
    for col in ("name", "scope", "starts with", "created", "revoked"):
        table.add_column(col, overflow="fold")
    for t in tokens:
        revoked = as_utc(t.revoked_at)
        table.add_row(
            t.name, t.scope, f"{t.prefix}…", f"{as_utc(t.created_at):%Y-%m-%d %H:%M:%S}Z",
            f"{revoked:%Y-%m-%d %H:%M:%S}Z" if revoked else "",
        )  # fmt: skip
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token: requests with it answer 401 from now on."""
    from db.session import transaction
    from db.tokens import revoke_token

    with _database() as sessions:
        try:
            with transaction(sessions) as session:
                revoke_token(session, name)
        except RadqError as exc:
            raise _fail(str(exc)) from None
    console.print(f"token {name!r} revoked")


@contextlib.contextmanager
def _database() -> Iterator[sessionmaker[Session]]:
    """Sessions on RADQ_DATABASE_URL, for commands that work on the database directly."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import make_engine, make_sessionmaker

    engine = make_engine(_settings().resolved_database_url)
    try:
        yield make_sessionmaker(engine)
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise _fail(f"database error (has `radq db upgrade` run?): {type(exc).__name__}: {cause}") from None
    finally:
        engine.dispose()


@models_app.command("list")
def models_list() -> None:
    """List the models in RADQ_MODEL_DIR."""
    from rich.table import Table

    from radq.model_card import discover_cards

    settings = _settings()
    table = Table(title=f"models in {settings.model_dir}")
    for col in ("name", "version", "device", "task", "labels", "intended use"):
        table.add_column(col, overflow="fold")
    for name, (_, card) in sorted(discover_cards(settings.model_dir).items()):
        table.add_row(name, card.version, card.device, card.task, ", ".join(card.labels), card.intended_use)
    console.print(table)


@models_app.command("validate")
def models_validate(path: Annotated[Path, typer.Argument(help="A model directory.")]) -> None:
    """Check a model directory: card, weights checksum, and that the weights load."""
    import torch

    from workers.models.loader import load_model

    try:
        loaded = load_model(path, torch.device("cpu"))
    except RadqError as exc:
        raise _fail(str(exc)) from None
    console.print(f"ok: {loaded.key} ({loaded.card.architecture}, {len(loaded.card.labels)} labels)")


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="A model name in RADQ_MODEL_DIR, or a model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """Show a model's card: what it is, what it was trained on, what it is for."""
    from rich.table import Table

    from radq.model_card import discover_cards, read_card

    settings = _settings()
    found = discover_cards(settings.model_dir).get(name)
    try:
        if found is not None:
            model_dir, card = found
        elif Path(name).is_dir():
            model_dir, card = Path(name), read_card(Path(name))
        else:
            raise _fail(f"model {name!r} not found in {settings.model_dir}")
    except RadqError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(card.model_dump_json(indent=2))
        return
    table = Table(title=f"{card.name}@{card.version} ({model_dir})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for field, value in card.model_dump(mode="json").items():
        table.add_row(field, value if isinstance(value, str) else json.dumps(value))
    console.print(table)


@models_app.command("import")
def models_import(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors, .pt, .pth or .pth.tar checkpoint.")],
    name: Annotated[str, typer.Option(help="Model name (also the directory name).")],
    version: Annotated[str, typer.Option(help="Model version.")],
    architecture: Annotated[str, typer.Option(help="densenet121, resnet18, resnet50, radq-smallcnn.")],
    labels: Annotated[str, typer.Option(help="Comma-separated labels, in output order.")],
    training_data: Annotated[str, typer.Option(help="What the weights were trained on, by whom.")],
    intended_use: Annotated[str, typer.Option(help="What the outputs may be used for.")],
    limitations: Annotated[str, typer.Option(help="Known limitations of the weights.")],
    license: Annotated[str, typer.Option(help="License of the weights.")],
    input_size: Annotated[int, typer.Option(help="Input height and width.")] = 224,
    channels: Annotated[int, typer.Option(help="Input channels (1 or 3).")] = 3,
    task: Annotated[str, typer.Option(help="Task description for the card.")] = "multi-label classification",
    output_activation: Annotated[str, typer.Option(help="sigmoid or softmax.")] = "sigmoid",
    preprocessing_json: Annotated[
        Path | None, typer.Option(help="JSON file with the card's preprocessing section.")
    ] = None,
    dest: Annotated[Path | None, typer.Option(help="Model root (default RADQ_MODEL_DIR).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing model.")] = False,
) -> None:
    """Convert a checkpoint into a model directory (safetensors weights and a card)."""
    from workers.models.convert import import_checkpoint

    preprocessing = None
    if preprocessing_json is not None:
        try:
            preprocessing = json.loads(preprocessing_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _fail(f"{preprocessing_json}: cannot read preprocessing JSON: {exc}") from None
    try:
        out = import_checkpoint(
            checkpoint,
            dest or _settings().model_dir,
            name=name,
            version=version,
            architecture=architecture,
            labels=[label.strip() for label in labels.split(",") if label.strip()],
            input_size=input_size,
            channels=channels,
            preprocessing=preprocessing,
            task=task,
            output_activation=output_activation,
            training_data=training_data,
            intended_use=intended_use,
            limitations=limitations,
            license=license,
            overwrite=overwrite,
        )
    except RadqError as exc:
        raise _fail(str(exc)) from None
    console.print(f"imported {name}@{version} into {out}")


@app.command()
def demo(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the job.")] = 600,
) -> None:
    """Run the whole pipeline on the bundled sample DICOM (embedded mode)."""
    from radq.demo import run_demo

    try:
        code = run_demo(_settings(), console, timeout=timeout)
    except RadqError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
