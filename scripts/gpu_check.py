"""Prove the CUDA path and measure GPU throughput (run on a host with a GPU).

1. Model alone on the GPU: images/s at several batch sizes (fp32, inference mode).
2. The worker pipeline (claim, decode+preprocess threads, batched inference on CUDA,
   bulk SQL writes) over generated 512x512 CT files in a SQLite database, timed.
3. GPU and CPU outputs of the same inputs agree.

Usage: ``python scripts/gpu_check.py [--n 512] [--threads 8]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.uid import generate_uid

from db.jobs import NewInstance, add_instances, create_job, job_counts
from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker, transaction
from db.status import StorageKind
from radq.settings import BUNDLED_MODEL_DIR, Settings
from workers.context import get_context
from workers.models.loader import load_model
from workers.pipeline import run_chunk

SAMPLES = Path(__file__).resolve().parent.parent / "radq" / "samples" / "real"


def model_only(device: torch.device, batch: int, seconds: float = 3.0, name: str = "radq-smoke") -> float:
    loaded = load_model(BUNDLED_MODEL_DIR / name, device)
    model, spec = loaded.module, loaded.card.input
    x = torch.randn(batch, spec.channels, spec.height, spec.width, device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize(device)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def generate(root: Path, n: int) -> list[Path]:
    template = pydicom.dcmread(SAMPLES / "CT_small.dcm")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[-256:256, -256:256]
    body = ((xx**2 + yy**2) < 200**2).astype(np.int16) * 1000 - 1000
    paths = []
    study, series = generate_uid(), generate_uid()
    for i in range(n):
        ds = template.copy()
        ds.Rows = ds.Columns = 512
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = (body + rng.integers(0, 80, (512, 512), dtype=np.int16)).astype(np.int16).tobytes()
        path = root / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pipeline(root: Path, files: list[Path], device: str, threads: int, batch: int) -> dict[str, float]:
    url = f"sqlite:///{root / f'radq-{device}.db'}"
    upgrade(url)
    settings = Settings(
        home=root, database_url=url, device=device, batch_size=batch, decode_processes=threads
    )
    sessions = make_sessionmaker(make_engine(url))
    with transaction(sessions) as session:
        job = create_job(session, models=["radq-smoke"])
        ids = add_instances(
            session, job_id=job.id, files=[NewInstance(p.name, StorageKind.PATH, str(p)) for p in files]
        )
    ctx = get_context(settings)
    ctx.models.get("radq-smoke")  # load outside the timing, as a running worker would have
    start = time.perf_counter()
    report = run_chunk(ctx, job.id, ids)
    elapsed = time.perf_counter() - start
    with sessions() as session:
        counts = job_counts(session, job.id)
    assert counts["done"] == len(files), counts
    return {
        "images": len(files),
        "seconds": round(elapsed, 3),
        "img_per_s": round(len(files) / elapsed, 1),
        "done": report.done,
    }


def agreement() -> float:
    cpu = load_model(BUNDLED_MODEL_DIR / "radq-smoke", torch.device("cpu")).module
    gpu = load_model(BUNDLED_MODEL_DIR / "radq-smoke", torch.device("cuda")).module
    x = torch.randn(8, 1, 224, 224)
    with torch.inference_mode():
        return float((torch.sigmoid(cpu(x)) - torch.sigmoid(gpu(x.cuda())).cpu()).abs().max())


def gradcam_check() -> dict[str, object]:
    """Grad-CAM on CUDA for the DenseNet: maps exist, and match the CPU's."""
    from workers.gradcam import explain

    inputs = [np.random.default_rng(i).normal(0, 1, (3, 224, 224)).astype(np.float32) for i in range(4)]
    cpu = explain(load_model(BUNDLED_MODEL_DIR / "chexnet-densenet121", torch.device("cpu")), inputs, 0.0)
    gpu = explain(load_model(BUNDLED_MODEL_DIR / "chexnet-densenet121", torch.device("cuda")), inputs, 0.0)
    diff = max(
        float(np.abs(gpu.saliency[i][label] - cpu.saliency[i][label]).max())
        for i in range(len(inputs))
        for label in cpu.saliency[i]
    )
    return {"maps": sum(len(m) for m in gpu.saliency), "max_abs_diff_vs_cpu": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    device = torch.device("cuda")
    out: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_only_img_per_s": {b: round(model_only(device, b), 1) for b in (16, 64, 256)},
        "max_abs_diff_gpu_vs_cpu_probabilities": agreement(),
        "model_only_img_per_s_batch64": {
            name: round(model_only(device, 64, name=name), 1)
            for name in ("chexnet-densenet121", "headct-resnet18", "us-abdomen-smallcnn")
        },
        "gradcam_on_cuda": gradcam_check(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = generate(root, args.n)
        out["pipeline_cuda_batch64"] = pipeline(root, files, "cuda", args.threads, 64)
        out["pipeline_cpu_batch16"] = pipeline(root, files[: max(32, args.n // 8)], "cpu", args.threads, 16)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
