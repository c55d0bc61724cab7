"""``python -m bench``: generate DICOM, measure each figure in one run, print and save the report."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench import data, machine, report
from bench.measure import Measurement, decode_preprocess, median, model_only, naive_loop
from bench.pipeline import pipeline, warm_up
from bench.stack import DATABASES, Stack, embedded_stack
from radq.errors import RadqError
from radq.model_card import discover_cards
from radq.settings import Settings
from workers.device import resolve_device
from workers.models.loader import LoadedModel, load_model

MODEL = "radq-smoke"
"""The model every figure runs (bundled; 1x224x224 input)."""
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
"""Where the JSON report goes unless --out says otherwise (git-ignored)."""
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
"""Server used with --database postgresql; the bench creates and drops its own database there."""
WARMUP_CT, WARMUP_CR = 2, 2
"""Files in the untimed warm-up job, which starts the worker's child and loads the model."""
BATCH1_IMAGES = 64
"""Images of the batch-1 model figure, which only explains the naive loop."""
EXIT_OK = 0
"""Every figure was measured and every timed instance was processed."""
EXIT_FAILED = 1
"""A phase failed, or some instances of a pipeline job failed or were skipped."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--n", type=int, default=400, help="DICOM files per figure (default 400)")
    parser.add_argument("--database", choices=DATABASES, default="sqlite", help="database of the pipeline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report path")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every figure; the median is shown")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated DICOM and tensors")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="PostgreSQL server for --database")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a pipeline job may take")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        parser.error("--n and --repeat must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the stack's cleanup


@dataclass
class _Context:
    """What every round works on, set up once."""

    settings: Settings
    model: LoadedModel
    work: Path
    corpus: data.Corpus
    files: list[Path]
    stack: Stack


def _round(args: argparse.Namespace, ctx: _Context, index: int) -> dict[str, Measurement]:
    """Every figure once; rounds interleave so that a burst of other load hits them alike."""
    pixels = ctx.settings.max_image_pixels
    batch = ctx.settings.batch_size
    return {
        "model_only": model_only(ctx.model, images=args.n, batch_size=batch, seed=args.seed + index),
        "model_batch1": model_only(ctx.model, images=BATCH1_IMAGES, batch_size=1, seed=args.seed + index),
        "decode_preprocess": decode_preprocess(ctx.files, ctx.model, max_pixels=pixels),
        "naive_loop": naive_loop(
            ctx.files, ctx.model, db_path=ctx.work / f"naive-{index}.db", max_pixels=pixels
        ),
        "pipeline": pipeline(
            ctx.stack, ctx.corpus.root, files=ctx.corpus.files, model=MODEL, timeout=args.timeout
        ),
    }


def run(args: argparse.Namespace, console: Console) -> dict[str, object]:
    """Generate the corpus, start the stack, measure every figure ``--repeat`` times; return the report."""
    settings = Settings()
    device = resolve_device(settings.device)
    model = load_model(discover_cards(settings.model_dir)[MODEL][0], device)
    rounds: dict[str, list[Measurement]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="radq-bench-") as tmp:
        work = Path(tmp)
        ct, cr = data.split(args.n)
        console.print(f"generating {ct} CT + {cr} CR files (seed {args.seed}) ...")
        corpus = data.generate(work / "dicom", ct_files=ct, cr_files=cr, seed=args.seed)
        data.generate(work / "warmup", ct_files=WARMUP_CT, cr_files=WARMUP_CR, seed=args.seed, label="warmup")
        console.print(f"starting API and worker ({args.database}), untimed warm-up job ...")
        home = work / "home"
        with embedded_stack(
            settings, home=home, database=args.database, postgres_admin_url=args.postgres_url
        ) as stack:
            warm = warm_up(
                stack, work / "warmup", files=WARMUP_CT + WARMUP_CR, model=MODEL, timeout=args.timeout
            )
            ctx = _Context(settings, model, work, corpus, data.files_of(corpus), stack)
            for index in range(args.repeat):
                console.print(
                    f"round {index + 1}/{args.repeat}: model only, decode, naive loop, pipeline ..."
                )
                for key, measurement in _round(args, ctx, index).items():
                    rounds[key].append(measurement)
    card = model.card
    return report.build(
        results={key: median(runs) for key, runs in rounds.items()},
        machine=machine.describe(device),
        dicom=corpus.describe(),
        model={
            "name": f"{card.name}@{card.version}",
            "input": f"{card.input.channels}x{card.input.height}x{card.input.width}",
            "architecture": card.architecture,
        },
        run={
            "files": args.n,
            "database": args.database,
            "rounds": args.repeat,
            "seed": args.seed,
            "warmup": {"files": warm.files, "seconds": round(warm.total_s, 3)},
            "pipeline_all_done": all(m.detail["counts"] == {"done": args.n} for m in rounds["pipeline"]),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough that the tables do not wrap
        console = Console(width=150)
    try:
        result = run(args, console)
    except RadqError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    report.write(result, args.out)  # first: a closed stdout must not cost the figures
    report.render(result, console)
    console.print(f"report written to {args.out}")
    return EXIT_OK if result["run"]["pipeline_all_done"] else EXIT_FAILED  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
