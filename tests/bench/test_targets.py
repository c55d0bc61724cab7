"""The bench's verdicts: which stage bounds a pipeline, and the figure it is held to."""

from __future__ import annotations

import pytest

from bench.targets import SHARED_CORES, Rates, shared_cores_rate, summarize


def _cpu_row(model_only: float, decoder: float, pipeline: float) -> dict[str, object]:
    rates = Rates(model_only=model_only, decode=2 * decoder, decoder=decoder, naive=30.0, pipeline=pipeline)
    return summarize(
        rates, device="cpu", architecture="densenet121", input_name="ct", decode_processes=2, host_cores=2
    )


def test_on_a_cpu_the_model_and_decoding_share_the_cores() -> None:
    # DenseNet-121 at 100 img/s on 2 cores costs 20 ms of CPU per image; decoding 5 ms more.
    assert shared_cores_rate(100.0, 200.0, 2) == pytest.approx(80.0)
    summary = _cpu_row(model_only=100.0, decoder=200.0, pipeline=60.0)
    assert summary["bound"] == SHARED_CORES
    assert summary["bound_img_s"] == pytest.approx(80.0)
    assert summary["pipeline_over_bound"] == pytest.approx(0.75)
    # The target is still against the model alone, and is reported as not met.
    assert {t["target"]: t["met"] for t in summary["targets"]}[">= 0.90x model"] is False  # type: ignore[index, union-attr]


def test_a_slow_decoder_bounds_a_gpu_pipeline_by_decode_capacity() -> None:
    rates = Rates(model_only=6000.0, decode=400.0, decoder=300.0, naive=30.0, pipeline=500.0)
    summary = summarize(
        rates, device="cuda", architecture="densenet121", input_name="ct", decode_processes=2, host_cores=16
    )
    assert summary["bound"] == "decode" and summary["bound_img_s"] == pytest.approx(600.0)
    assert SHARED_CORES not in str(summary["bound_why"])  # the GPU does not share the host's cores
