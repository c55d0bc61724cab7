"""The one settings object, read from ``RADQ_*`` environment variables.

Build it at an entry point (CLI command, test fixture) and pass it down; nothing in
radq reads the environment at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "workers" / "bundled_models"
"""Models shipped inside the package; the default ``RADQ_MODEL_DIR``."""


def _split_paths(value: object) -> object:
    if isinstance(value, str):
        return [Path(p) for p in value.split(os.pathsep) if p.strip()]
    return value


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Everything an operator can configure. Env var names are ``RADQ_`` + field name."""

    model_config = SettingsConfigDict(env_prefix="RADQ_", extra="ignore")

    env: Literal["development", "production"] = Field(
        "development",
        description="production: `radq api/worker/scp/flower` refuse to start with development-only "
        "settings (auth off, no pseudonym key, SQLite, the compose password); see radq.deployment.",
    )
    home: Path = Field(Path(".radq"), description="State directory for the embedded mode.")
    auth: bool = Field(
        True, description="Require an API token (Authorization: Bearer) on every /v1 and /dicomweb route."
    )
    api_token: SecretStr | None = Field(
        None, description="The token the CLI client sends (`radq tokens create` makes one)."
    )
    pseudonym_key: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 that turns PatientID into the stored pseudonym; every "
        "worker must have the same. Development without one: generated once into home/pseudonym.key.",
    )
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite under home.")
    broker_url: str = "redis://127.0.0.1:6379/0"
    blob_dir: Path | None = Field(None, description="Content-addressed store for uploads.")
    blob_url: str = Field(
        "",
        pattern=r"^(|file:///.*|s3://[^/]+(/.*)?)$",
        description="Where uploads are kept: file:///abs/dir or s3://bucket/prefix (S3 credentials and "
        "endpoint from the AWS_* variables boto3 reads); empty: the directory blob_dir.",
    )
    blob_retention_days: float = Field(
        0.0,
        ge=0,
        description="Days an uploaded file is kept after the last job that references it finished; 0: "
        "deleted as soon as its results are written. Saliency maps and path submissions are never deleted.",
    )
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories path submissions may read from (os.pathsep-separated).",
    )
    model_dir: Path = BUNDLED_MODEL_DIR
    default_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="Models a job runs when it names none; 'auto' routes by each card's applies_to.",
    )
    chunk_size: int = Field(64, ge=1, le=4096, description="Instances per Celery message.")
    worker_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description="Messages one worker process holds at once (radq worker --concurrency); their "
        "instances share batches. A GPU worker that drains between messages wants more.",
    )
    worker_max_messages: int = Field(
        16,
        ge=1,
        le=256,
        description="Most messages one worker process holds while those beyond "
        "RADQ_WORKER_CONCURRENCY are small (fewer instances than RADQ_BATCH_SIZE): one-file jobs "
        "then share batches; big messages in hand stay at RADQ_WORKER_CONCURRENCY.",
    )
    batch_size: int = Field(16, ge=1, le=1024, description="Images per model forward pass.")
    decode_processes: int = Field(
        0,
        ge=0,
        le=256,
        description="Processes that read and decode files for one worker process; 0: the cores it may use.",
    )
    decode_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds one decode task (up to 8 files of a message) may take to read and decode "
        "before its process is stopped; its files then go again one per task, so a file that hangs a "
        "codec or a reader fails alone with that reason, after up to twice this time.",
    )
    batch_deadline: float = Field(
        0.1,
        ge=0,
        le=60,
        description="Seconds a partly filled batch waits for more images before it runs anyway; it "
        "runs at once when no more are being decoded.",
    )
    decode_ahead: int = Field(
        0,
        ge=0,
        le=4096,
        description="Decoded instances a worker process holds waiting for the model; bounds its memory. "
        "0: two batches per inference stream plus one per decode process.",
    )
    preprocess_in_decoders: bool = Field(
        True,
        description="CPU workers: the decode processes also preprocess (rescale, window, resize, "
        "normalise) into finished model inputs, one torch thread each, instead of the inference "
        "thread doing it in batches. CUDA workers always preprocess on the GPU.",
    )
    infer_streams: int = Field(
        0,
        ge=0,
        le=64,
        description="Threads of a worker process that run forward passes at once, each forming its own "
        "batches with RADQ_TORCH_THREADS torch threads. 0: one per usable core on the CPU (at most 4), "
        "one on CUDA. On 2 cores, two single-threaded streams ran DenseNet-121 11-16% faster than one "
        "two-threaded stream: no barrier stalls between the threads of one forward pass.",
    )
    host_preprocess_pixels: int = Field(
        0,
        ge=0,
        description="CUDA workers: frames of at least this many pixels (rows x columns) are preprocessed "
        "in the decode processes, as on CPU workers, and cross to the worker process finished (a "
        "2500x2048 CR as 0.2 MB, not 10 MB); 0: the GPU preprocesses every frame.",
    )
    gpu_decode: str = Field(
        "auto",
        pattern=r"^(auto|on|off)$",
        description="CUDA workers: decode JPEG and JPEG 2000 on the GPU with NVIDIA nvImageCodec "
        "(pip install 'radq[gpu-decode]'), the CPU codecs as the fallback. auto: where it is installed; "
        "on: a worker without it refuses to start; off: always the CPU.",
    )
    precision: str = Field(
        "auto",
        pattern=r"^(auto|fp32|fp16|bf16)$",
        description="Inference precision. auto: where the model card allows mixed precision, fp16 "
        "autocast on CUDA and bf16 autocast on a CPU with bf16 in hardware (AVX512-BF16 or AMX); "
        "float32 otherwise.",
    )
    channels_last: bool = Field(
        True,
        description="Run convolutions in channels-last memory format (faster with cuDNN and with oneDNN on "
        "the CPU: DenseNet-121 +10%, ResNet-18 +48% on a 2-core EPYC).",
    )
    compile: str = Field(
        "auto",
        pattern=r"^(auto|off|trace|inductor)$",
        description="How models are compiled at load. trace: traced and frozen TorchScript graph (CPU: "
        "DenseNet-121 +24%); inductor: torch.compile (slow start); auto: trace on the CPU, off on CUDA.",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch CPU threads of each inference stream; 0: the cores the worker process may "
        "use, shared among its streams.",
    )
    queue: str = Field(
        "radq",
        description="The general Celery queue (jobs of several CPU models, webhooks); every worker takes it.",
    )
    queue_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]*$",
        description="Prepended to the routed queue names (gpu, cpu, model.<name>), so that several radq "
        "deployments can share one Redis database.",
    )
    api_url: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    max_archive_members: int = Field(100_000, ge=1)
    min_free_bytes: int = Field(
        1024**3,
        ge=0,
        description="Free space the API leaves on the disk its uploads are spooled to (the "
        "database, logs and blob store often share it): a request that would leave less is "
        "refused with 507, before its body is read when it declares its length. 0: no reserve.",
    )
    max_compression_ratio: float = Field(
        200.0,
        gt=1,
        description="Largest uncompressed/compressed size ratio accepted for an archive member (zip) "
        "or a compressed tar stream; zip-bomb guard.",
    )
    max_image_pixels: int = Field(
        256 * 1024 * 1024, ge=1, description="Largest rows*cols*frames*samples decoded."
    )
    dedup: bool = Field(
        True, description="Reuse results for instances already processed (same SOPInstanceUID and content)."
    )
    lease_seconds: int = Field(
        60,
        ge=3,
        le=86_400,
        description="A claimed instance's lease; its worker renews it every third of this. When a "
        "worker dies or hangs, the reaper takes its instances back after at most this long.",
    )
    max_lost_leases: int = Field(
        3, ge=1, le=100, description="Leases a file may lose (its worker died or hung) before it is failed."
    )
    chunk_time_limit: float = Field(
        1800.0,
        gt=0,
        description="Seconds a worker waits for one message's instances before it gives up on the rest; "
        "their leases then lapse and the reaper sends them again. A file that hangs its reader is "
        "stopped sooner, by RADQ_DECODE_TIMEOUT.",
    )
    worker_idle_transaction_timeout: float = Field(
        60.0,
        gt=0,
        description="PostgreSQL: seconds a worker's transaction may sit idle before the server ends it and "
        "releases its row locks (a worker host cut off mid-transaction would otherwise hold them for hours).",
    )
    visibility_timeout: int = Field(
        3600,
        ge=1,
        description="Redis: seconds before a delivered but unacknowledged message is delivered again. "
        "Leases make such a redelivery harmless, even while the first worker is still at it.",
    )
    reconcile_seconds: float = Field(
        300.0,
        gt=0,
        description="How often the API re-publishes instances the database says are queued but that no "
        "message in the broker carries (after Redis lost its data), or only one a worker took more than "
        "RADQ_LEASE_SECONDS ago and never claimed (the worker died).",
    )
    registration_lease_seconds: int = Field(
        120,
        ge=2,
        le=3600,
        description="How long an API process holds a path submission it is enumerating without "
        "renewing; after that another API process (or the restarted one) resumes it.",
    )
    maintenance_seconds: float = Field(
        10.0, gt=0, le=3600, description="How often the API resumes abandoned enumerations and re-queues."
    )
    requeue_after_seconds: float = Field(
        60.0,
        gt=0,
        description="An instance recorded but never published (broker down) is published again after this.",
    )
    scp_spool_dir: Path | None = Field(
        None,
        description="Where `radq scp` keeps received files until their job is recorded; default: "
        "home/scp-spool. One spool per SCP process.",
    )
    scp_quiet_seconds: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description="`radq scp --group study`: submit a study once this long passes without a new instance.",
    )
    scp_shutdown_grace_seconds: float = Field(
        5.0,
        ge=0,
        le=600,
        description="On SIGTERM, how long open associations may go on before `radq scp` aborts them.",
    )

    log_format: str = Field(
        "text",
        pattern=r"^(text|json)$",
        description="Log lines of api, worker, scp and flower: text, or json (one object per line with "
        "time, level, logger, message, and job_id, instance_id, worker where known).",
    )
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="TCP port on which each worker process serves its Prometheus metrics; 0: off.",
    )
    flower_basic_auth: str | None = Field(
        None,
        pattern=r"^[^:]+:.+$",
        description="user:password that `radq flower` requires (the --basic-auth option overrides it).",
    )
    flower_db: Path | None = Field(
        None, description="File where `radq flower` keeps its state across restarts; default home/flower.db."
    )

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: object) -> object:
        return _split_paths(value)

    @field_validator("default_models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        return _split_commas(value)

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file and preferring psycopg 3 for PostgreSQL."""
        url = self.database_url or f"sqlite:///{(self.home / 'radq.db').resolve()}"
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url

    @property
    def resolved_flower_db(self) -> Path:
        return (self.flower_db or self.home / "flower.db").resolve()

    @property
    def resolved_blob_dir(self) -> Path:
        return (self.blob_dir or self.home / "blobs").resolve()

    def to_env(self) -> dict[str, str]:
        """These settings as ``RADQ_*`` variables, for starting child processes."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                text = value.get_secret_value()
            elif name == "allowed_roots":
                text = os.pathsep.join(str(p) for p in value)
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[f"RADQ_{name.upper()}"] = text
        return env

    def ensure_dirs(self) -> None:
        """Create the state directories the embedded mode writes to."""
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.blob_url:  # another store (S3, a file URL) is made on first write
            self.resolved_blob_dir.mkdir(parents=True, exist_ok=True)
