"""``python -m bench``: measure the (model, input) matrix of issue 7 in one run; print and save the report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bench import machine, report
from bench.inputs import DEFAULT_CACHE, INPUTS, Corpus
from bench.matrix import FIGURES, Outcome, Plan, run_matrix
from bench.models import DEFAULT_MODELS, Pair, matrix, model_dir
from bench.pipeline import SUBMIT_MODES
from bench.stack import DATABASES, decode_processes, embedded_stack
from bench.targets import Rates, summarize
from radq.errors import RadqError
from radq.model_card import ModelCard, discover_cards
from radq.settings import Settings
from workers.device import resolve_device
from workers.engine import torch_threads
from workers.gpu_decode import DECODERS, gpu_decode_device

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
"""Where the JSON report goes unless --out says otherwise (git-ignored)."""
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
"""Server used with --database postgresql; the bench creates and drops its own database there."""
DEFAULT_SECONDS = 20.0
"""Seconds each figure of a row aims to take."""
QUICK_SECONDS = 3.0
"""--quick: seconds per figure."""
QUICK_MODELS = ("radq-smoke",)
"""--quick: the tiny bundled model, on every input."""
EXIT_OK = 0
"""Every row was measured and every timed instance was processed."""
EXIT_FAILED = 1
"""A model's figures stopped short, or some instances of a pipeline job failed or were skipped."""


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--models", type=_names, default=None, help=f"comma-separated (default {','.join(DEFAULT_MODELS)})"
    )
    parser.add_argument(
        "--inputs", type=_names, default=None, help=f"comma-separated of {','.join(INPUTS)} (default all)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help=f"per figure (default {DEFAULT_SECONDS:g})"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every figure; the median is shown")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"smoke run: {','.join(QUICK_MODELS)} on every input, {QUICK_SECONDS:g}s per figure",
    )  # fmt: skip
    parser.add_argument("--max-images", type=int, default=2000, help="most files of one pipeline job")
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="database of the pipeline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated DICOM and tensors")
    parser.add_argument(
        "--submit", choices=SUBMIT_MODES, default="paths",
        help="pipeline jobs: paths read in place (default), files uploaded over HTTP, or each "
        "path posted as a job of its own (a stream of one-image jobs)",
    )  # fmt: skip
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where generated corpora are kept")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="PostgreSQL server for --database")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a pipeline job may take")
    args = parser.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    args.inputs = args.inputs or list(INPUTS)
    args.seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    unknown = [name for name in args.inputs if name not in INPUTS]
    if unknown:
        parser.error(f"unknown input(s) {', '.join(unknown)}; known: {', '.join(INPUTS)}")
    if args.repeat < 1 or args.seconds <= 0 or args.max_images < 1:
        parser.error("--repeat and --max-images must be at least 1, --seconds above 0")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the stack's cleanup


def _row(
    pair: Pair, outcome: Outcome, card: ModelCard, settings: Settings, device: torch.device
) -> dict[str, Any]:
    medians = outcome.medians(pair)
    row: dict[str, Any] = {
        "model": pair.model,
        "input": pair.input,
        "figures": {name: medians[name].as_dict() for name in FIGURES if name in medians},
    }
    if any(name not in medians for name in FIGURES):
        row["summary"] = None
        return row
    pipe = medians["pipeline"]
    upload_s = float(pipe.detail["upload_s"])  # type: ignore[arg-type]
    registered_s = float(pipe.detail.get("registered_s") or 0.0)  # type: ignore[arg-type]
    worker_cpu_s = float(pipe.detail.get("worker_process_cpu_s") or 0.0)  # type: ignore[arg-type]
    rates = Rates(
        model_only=medians["model_only"].rate,
        decode=medians["decode"].rate,
        decoder=medians["decoder"].rate,
        naive=medians["naive_loop"].rate,
        pipeline=pipe.rate,
        upload=pipe.images / upload_s if upload_s else 0.0,
        registration=pipe.images / registered_s if registered_s else 0.0,
        worker_process=pipe.images / worker_cpu_s if worker_cpu_s else 0.0,
    )
    on_gpu = gpu_decode_device(settings.gpu_decode, device.type, device.index) is not None
    row["summary"] = summarize(
        rates,
        gpu_decoded=on_gpu and INPUTS[pair.input].transfer_syntax in {d.UID for d in DECODERS},
        device=device.type,
        architecture=card.architecture,
        input_name=pair.input,
        decode_processes=decode_processes(settings),
        host_cores=os.cpu_count() or 1,
    )
    row["all_done"] = all(m.detail["counts"] == {"done": m.images} for m in outcome.rounds[pair]["pipeline"])
    return row


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Prepare models and inputs, start the stack, measure the matrix; return the report."""
    base = Settings()
    device = resolve_device(base.device)
    torch.set_num_threads(torch_threads(base, device.type))  # as a worker: per inference stream
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a worker: fixed input sizes
    with tempfile.TemporaryDirectory(prefix="radq-bench-") as tmp:
        work = Path(tmp)
        models_root = model_dir(base.model_dir, work / "models")
        settings = base.model_copy(update={"model_dir": models_root, "dedup": False})
        found = discover_cards(models_root)
        missing = [name for name in args.models if name not in found]
        if missing:
            raise RadqError(f"unknown model(s) {', '.join(missing)}; known: {', '.join(sorted(found))}")
        cards = {name: card for name, (_, card) in found.items()}
        rows, notes = matrix(cards, args.models, {name: INPUTS[name] for name in args.inputs})
        if not rows:
            raise RadqError("no model applies to any chosen input: " + "; ".join(notes))
        corpora = {name: Corpus(INPUTS[name], cache=args.cache, seed=args.seed) for name in args.inputs}
        used = sorted({pair.input for pair in rows}, key=list(INPUTS).index)
        console.print(f"preparing inputs {', '.join(used)} (cached under {args.cache}) ...")
        for name in used:
            corpora[name].bases()
        plan = Plan(rows, args.seconds, args.repeat, args.max_images, args.seed, args.timeout, args.submit)
        # Path submissions read the generated files where they lie, as from a shared archive.
        settings = settings.model_copy(update={"allowed_roots": [args.cache.resolve()]})
        console.print(
            f"starting Redis/API ({args.database}); {len(rows)} rows, about {args.seconds:g}s per figure"
        )
        with embedded_stack(
            settings, home=work / "home", database=args.database, postgres_admin_url=args.postgres_url,
            worker=False,
        ) as stack:  # fmt: skip
            outcome = run_matrix(
                plan, stack, model_dirs={name: path for name, (path, _) in found.items()},
                corpora=corpora, device=device, work=work, say=console.print,
            )  # fmt: skip
    notes.extend(f"{name} stopped short: {error}" for name, error in outcome.errors.items())
    return {
        "run": {
            "seconds": args.seconds,
            "rounds": args.repeat,
            "seed": args.seed,
            "database": args.database,
            "device": str(device),
            "batch_size": settings.batch_size,
            "decode_processes": decode_processes(settings),
            "gpu_decode": gpu_decode_device(settings.gpu_decode, device.type, device.index) is not None,
            "chunk_size": settings.chunk_size,
            "warmup_jobs": {
                name: {"files": w.files, "seconds": round(w.total_s, 3)}
                for name, w in outcome.warmups.items()
            },
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
        },
        "machine": machine.describe(device),
        "figures": report.FIGURE_LABELS,
        "models": {
            name: {
                "version": cards[name].version,
                "architecture": cards[name].architecture,
                "input": f"{cards[name].input.channels}x{cards[name].input.height}x{cards[name].input.width}",
            }
            for name in args.models
        },
        "inputs": {name: corpora[name].describe() for name in used},
        "rows": [
            _row(pair, outcome, cards[pair.model], settings, device) for pair in rows if outcome.rounds[pair]
        ],
        "notes": notes,
        "complete": not outcome.errors,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that the table does not wrap
        console = Console(width=200)
    try:
        result = run(args, console)
    except RadqError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    report.write(result, args.out)  # first: a closed stdout must not cost the figures
    report.render(result, console)
    console.print(f"report written to {args.out}")
    ok = result["complete"] and all(row.get("all_done") for row in result["rows"])
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
