"""Preprocessing split in two: integers leave the decode process, the model's device finishes them.

:func:`workers.preprocess.preprocess` is the reference, and converts every frame to
float32 in the decode process. Here the decode side (:func:`raw_frames`, numpy only:
decode processes never import torch) keeps the pixels as decoded, integers of half
the bytes of float32, and resolves per frame the few numbers the device needs;
:func:`to_batch` then rescales, windows, inverts, resizes and normalises whole batches
with tensor ops on the model's device. Frames the fast path does not cover (a Modality
or VOI LUT Sequence, float pixels that are not finite, unusual sample types) arrive
already windowed by :func:`workers.preprocess.windowed`.

Fidelity, in normalised units (after ``(x - mean) / std``): without decimation
``to_batch(raw_frames(...))`` is the reference's arithmetic op for op, and differs from
``preprocess`` by float32 rounding alone (at most 9.5e-7 over every test file and
bundled card). The CPU decimates frames of 2048x2048 and more (:func:`resize`), which
blurs a little more than the reference's antialiasing: on a generated 2500x2048 CR at
most 0.026 (mean 0.008) for smooth anatomy, 0.053 (mean 0.012) for fine line pairs.
Accelerators never decimate: the exact resize costs them little. :data:`TOLERANCE`
bounds both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from radq.model_card import InputSpec, Preprocessing
from workers.decode import DecodedImage
from workers.preprocess import (
    LUMA,
    YCBCR_TO_RGB,
    Voi,
    check_channels,
    check_rescaled_range,
    chroma_zero,
    colour_scale,
    normalisation,
    resolve_windows,
    to_channels,
    windowed,
)

if TYPE_CHECKING:  # decode processes stay torch-free: torch is imported inside to_batch
    import torch

TOLERANCE = 0.06
"""Largest difference from :func:`workers.preprocess.preprocess` in normalised units
(after ``(x - mean) / std``): the CPU's decimation, at worst 0.053 measured (a
2500x2048 CR of 2 x 3 pixel line pairs); otherwise float32 rounding, under 1e-6."""

CHUNK_VALUES = 1 << 25
"""Most pixel values (frames x planes x rows x columns) an accelerator converts at once:
128 MiB per float32 buffer, so a batch of 2500x2048 CRs is never all float32 at once."""

CPU_CHUNK_VALUES = 1 << 20
"""The same on the CPU, where a chunk that stays in cache runs the chain of elementwise
ops fastest (16 CT slices of 512x512 at once took twice as long, measured)."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""Bounds of the folded window parameters (:func:`_affine_params`): outside them, the
step-by-step ops, whose overflow and underflow the reference shares."""

DECIMATE_PIXELS = 1 << 22
"""The smallest frame (rows x columns) the CPU decimates by default: below 2048x2048
average pooling costs about what it saves (measured on 2 cores)."""

_Op = Literal["minmax", "affine", "threshold", "sigmoid"]


@dataclass(frozen=True, eq=False)
class RawFrame:
    """One model input as the decode side leaves it: picklable, numpy only.

    ``pixels`` is the row as decoded: (H, W) integers or finite float32 for grayscale,
    (H, W, 3) for ``colour``; when ``windowed`` (the fallback), the (C, H, W) float32
    planes in [0, 1] the reference makes, colour already reduced to what the model takes.
    """

    pixels: np.ndarray
    slope: float = 1.0
    """Rescale Slope, applied in float32 as the reference does."""
    intercept: float = 0.0
    """Rescale Intercept."""
    windows: tuple[Voi, ...] = ()
    """One (center, width, function) per output plane; empty for min-max."""
    low: float = 0.0
    """The frame's smallest rescaled value, float32 (min-max needs no pass on the device)."""
    high: float = 0.0
    """Its largest."""
    invert: bool = False
    """MONOCHROME1: low values display bright."""
    colour: bool = False
    """``pixels`` are (H, W, 3) colour samples, divided by ``scale``."""
    scale: float = 1.0
    """``2**bits_stored - 1`` for integer colour samples."""
    chroma: float | None = None
    """Colour samples are Y, Cb and Cr, Cb and Cr zero at this value once divided by
    ``scale``; for a 1-channel model only Y travels, (H, W, 1)."""
    windowed: bool = False
    """``pixels`` are the reference's windowed planes: the device only resizes them."""
    ready: bool = False
    """``pixels`` are the finished (C, H, W) float32 model input (:func:`finish_on_host`)."""


def _shippable(pixels: np.ndarray) -> np.ndarray | None:
    """The row in a dtype torch converts on any device, without copying integers; None if none."""
    dtype = pixels.dtype
    if (dtype.kind in "iu" and dtype.itemsize <= 2) or dtype == np.int32:
        return pixels
    if dtype == np.uint32 and (pixels.size == 0 or int(pixels.max()) < 2**31):
        return pixels.view(np.int32)  # same values, same bits: torch lacks uint32 arithmetic
    if dtype.kind == "f":
        values = pixels.astype(np.float32, copy=False)  # float64 narrowed, as the reference does first
        return values if np.isfinite(values).all() else None
    return None


def _rescaled_extremes(pixels: np.ndarray, slope: float, intercept: float) -> tuple[float, float]:
    """The float32 min and max of ``pixels * slope + intercept``, from the raw extremes alone.

    Float32 conversion, multiplication and addition round monotonically, so the
    extremes of the rescaled frame are the rescaled raw extremes, bit for bit.
    """
    ends = np.array([pixels.min(), pixels.max()]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # refused by check_rescaled_range
        if slope != 1.0:
            ends *= np.float32(slope)
        if intercept != 0.0:
            ends += np.float32(intercept)
    return float(ends.min()), float(ends.max())


def _fallback(image: DecodedImage, spec: InputSpec, recipe: Preprocessing, row: int) -> RawFrame:
    planes = to_channels(
        windowed(image, recipe, row), spec.channels, image.pixels.ndim == 4, chroma_zero(image)
    )
    return RawFrame(np.ascontiguousarray(planes, dtype=np.float32), windowed=True)


def _raw_frame(image: DecodedImage, spec: InputSpec, recipe: Preprocessing, row: int) -> RawFrame:
    pixels = image.pixels[row]
    if image.pixels.ndim == 4:
        chroma = chroma_zero(image)
        samples = (3,) if chroma is None else (1, 3)  # YCbCr may hold Y alone
        shipped = _shippable(pixels) if pixels.shape[-1] in samples and pixels.dtype.kind in "iu" else None
        if shipped is None:
            return _fallback(image, spec, recipe, row)
        if chroma is not None and spec.channels == 1:  # Y is the luminance: a third of the bytes
            shipped = np.ascontiguousarray(shipped[..., :1])
        return RawFrame(shipped, colour=True, scale=colour_scale(image), chroma=chroma)
    transform = image.transform(row)
    windows = resolve_windows(image, recipe, transform)
    shipped = _shippable(pixels)
    if image.modality_lut is not None or windows is None or shipped is None:
        return _fallback(image, spec, recipe, row)
    slope, intercept = transform.rescale_slope, transform.rescale_intercept
    low, high = _rescaled_extremes(shipped, slope, intercept)
    check_rescaled_range(low, high, transform)
    check_channels(max(1, len(windows)), spec.channels)
    return RawFrame(
        shipped, slope, intercept, windows, low, high, invert=image.photometric == "MONOCHROME1"
    )  # fmt: skip


def raw_frames(image: DecodedImage, spec: InputSpec, recipe: Preprocessing) -> list[RawFrame]:
    """The decode side: one :class:`RawFrame` per row of ``image.pixels``, pixels left as decoded.

    Args:
        image: frames from :func:`workers.decode.decode`.
        spec: the model's input shape.
        recipe: the model's windows and normalisation.

    Returns:
        Frames for :func:`to_batch`, in row order.

    Raises:
        ModelError: ``mean``/``std`` or ``channel_windows`` do not fit ``spec.channels``,
            or ``std`` has a zero (as :func:`workers.preprocess.preprocess`).
        UndecodablePixels: the file's Modality or VOI LUT Sequence cannot be applied, or
            its rescale takes values beyond what float32 windowing takes (same reasons).
    """
    normalisation(recipe, spec.channels)  # a card that cannot fit fails before any pixel work
    return [_raw_frame(image, spec, recipe, row) for row in range(image.pixels.shape[0])]


# The device side. Every function below imports torch only when called.


def _ops(frame: RawFrame) -> tuple[_Op, ...]:
    """How each plane of a grayscale frame is windowed."""
    if not frame.windows:
        return ("minmax",)
    ops: list[_Op] = []
    for _, width, function in frame.windows:
        threshold = function == "LINEAR" and width <= 1  # the standard's formula divides by width - 1
        ops.append("sigmoid" if function == "SIGMOID" else "threshold" if threshold else "affine")
    return tuple(ops)


def _group_key(frame: RawFrame) -> tuple[str, tuple[_Op, ...], tuple[int, ...], str]:
    """Frames stacked together: same kind, shape and dtype, and the same op for each plane."""
    if frame.windowed:
        kind = "planes"
    elif frame.colour:
        kind = "colour" if frame.chroma is None else "ycbcr"
    else:
        kind = "grayscale"
    return kind, _ops(frame) if kind == "grayscale" else (), frame.pixels.shape, frame.pixels.dtype.str


def _params(frame: RawFrame) -> list[float]:
    """Per plane (a, d, b) of ``clip((x - a) / d + b, 0, 1)``, the reference's op order.

    A threshold uses ``a`` alone (``x > a``); a sigmoid ``a`` and ``d`` (``-4 / width``).
    """
    if not frame.windows:  # min-max; a constant frame gives zeros: (x - low) / inf
        spread = frame.high - frame.low
        return [frame.low, spread if spread > 0 else float("inf"), 0.0]
    out: list[float] = []
    for center, width, function in frame.windows:
        if function == "LINEAR_EXACT":  # PS3.3 C.11.2.1.3.2
            out += [center, width, 0.5]
        elif function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
            out += [center, -4.0 / width, 0.0]
        else:  # PS3.3 C.11.2.1.2.1; width <= 1 is a threshold at center - 0.5
            out += [center - 0.5, width - 1, 0.5]
    return out


def _column(params: torch.Tensor, index: int) -> torch.Tensor:
    return params[:, index].view(-1, 1, 1, 1)


def widen(raw: torch.Tensor, unsigned16: bool) -> torch.Tensor:
    """Integers uploaded to a device as float32; ``unsigned16``: int16 bits of uint16 values.

    uint16 travels as int16 (torch's uint16 lacks most kernels, CUDA ones included) and
    is widened through int32 on the device, where the extra pass is cheap.
    """
    import torch

    if unsigned16:
        return raw.to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
    return raw.to(torch.float32)


def _upload(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The arrays stacked as float32 on ``device``; integers cross to an accelerator as integers."""
    import torch

    shape = (len(arrays), *arrays[0].shape)
    if device.type == "cpu":  # numpy converts while stacking: one pass, no integer copy
        out = torch.empty(shape, dtype=torch.float32)
        np.stack(arrays, out=out.numpy(), casting="unsafe")
        return out
    unsigned16 = arrays[0].dtype == np.uint16
    if unsigned16:
        arrays = [a.view(np.int16) for a in arrays]
    dtype = torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype
    host = torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")
    np.stack(arrays, out=host.numpy())
    raw = host.to(device, non_blocking=True)  # pinned: the copy overlaps the host's next steps
    return widen(raw, unsigned16) if arrays[0].dtype.kind in "iu" else raw


def _affine_params(frame: RawFrame, planes: int) -> list[float] | None:
    """Per plane (whole, scale, part) of :func:`_affine_planes`, computed in float64;
    None where float32 cannot hold them (a zero, huge or tiny slope or width)."""
    out: list[float] = []
    window = _params(frame)
    for p in range(planes):
        a, d, b = window[3 * p : 3 * p + 3]
        scale, offset = frame.slope / d, (frame.intercept - a) / d + b
        if frame.invert:  # 1 - clip(v, 0, 1) is clip(1 - v, 0, 1)
            scale, offset = -scale, 1.0 - offset
        if not FLOAT32_TINY <= abs(scale) <= FLOAT32_MAX or not math.isfinite(offset):
            return None
        shift = offset / scale
        if not abs(shift) <= FLOAT32_MAX:
            return None
        whole = float(round(shift))
        out += [whole, scale, (shift - whole) * scale]
    return out


def _affine_planes(x: torch.Tensor, frames: list[RawFrame], planes: int) -> torch.Tensor | None:
    """:func:`_grayscale` where every plane is a linear window: rescale, window and
    MONOCHROME1 inversion fold into ``clip((x + whole) * scale + part, 0, 1)``, four
    passes over a frame per plane instead of up to eight (a 2500x2048 CR: ~5 ms less).
    None, ``x`` untouched, where the parameters do not fit float32.

    ``x * scale + offset`` would be three, but inside the window it cancels two terms of
    about ``x * scale`` (~550 for a 3-wide window at 600 HU on CT), keeping float32's
    rounding of them (6e-5, measured); an integer ``whole`` added to integer pixels is
    exact, and the terms that follow are near the window's own [0, 1].
    """
    import torch

    rows = [_affine_params(f, planes) for f in frames]
    if any(row is None for row in rows):
        return None
    params = torch.tensor(rows, dtype=torch.float32).to(x.device)
    out = (
        x
        if planes == 1
        else torch.empty((len(frames), planes, *x.shape[2:]), dtype=torch.float32, device=x.device)
    )
    for p in range(planes):
        whole, scale, part = (_column(params, 3 * p + i) for i in range(3))
        plane = out[:, p : p + 1]
        if planes == 1:
            plane.add_(whole)
        else:
            torch.add(x, whole, out=plane)
        plane.mul_(scale).add_(part).clamp_(0.0, 1.0)
    return out


def _grayscale(frames: list[RawFrame], ops: tuple[_Op, ...], device: torch.device) -> torch.Tensor:
    """(b, planes, H, W) windowed to [0, 1] and inverted where MONOCHROME1."""
    import torch

    x = _upload([f.pixels for f in frames], device).unsqueeze(1)
    fused = _affine_planes(x, frames, len(ops)) if all(op == "affine" for op in ops) else None
    if fused is not None:
        return fused
    rows = [[f.slope, f.intercept, -1.0 if f.invert else 1.0, float(f.invert), *_params(f)] for f in frames]
    params = torch.tensor(rows, dtype=torch.float32).to(device)
    if any(f.slope != 1.0 for f in frames):  # as the reference: values * slope, then + intercept
        x.mul_(_column(params, 0))
    if any(f.intercept != 0.0 for f in frames):
        x.add_(_column(params, 1))
    planes = x  # one plane: windowed in place
    if len(ops) > 1:
        planes = torch.empty((len(frames), len(ops), *x.shape[2:]), dtype=torch.float32, device=device)
    for p, op in enumerate(ops):
        a, d, b = (_column(params, 4 + 3 * p + i) for i in range(3))
        plane = planes[:, p : p + 1]
        if op == "threshold":
            plane.copy_(x > a)
            continue
        if len(ops) == 1:
            plane.sub_(a)
        else:
            torch.sub(x, a, out=plane)
        if op == "sigmoid":
            plane.mul_(d).exp_().add_(1.0).reciprocal_()
        elif op == "minmax":  # in [0, 1] already: x <= high rounds to at most high - low
            plane.div_(d)
        else:
            plane.div_(d).add_(b).clamp_(0.0, 1.0)
    if any(f.invert for f in frames):  # 1 - v exactly where MONOCHROME1, v * 1 + 0 elsewhere
        planes.mul_(_column(params, 2)).add_(_column(params, 3))
    return planes


def _colour(frames: list[RawFrame], channels: int, device: torch.device) -> torch.Tensor:
    """(b, 3, H, W) RGB scaled to [0, 1], or its luminance for a 1-channel model (Y of YCbCr)."""
    import torch

    x = _upload([f.pixels for f in frames], device).permute(0, 3, 1, 2)
    x.div_(torch.tensor([f.scale for f in frames], dtype=torch.float32).to(device).view(-1, 1, 1, 1))
    if frames[0].chroma is not None:  # a group is all YCbCr or all RGB
        if channels == 1:  # Y, the luminance
            return x[:, :1]
        zeros = torch.tensor([f.chroma for f in frames], dtype=torch.float32).to(device).view(-1, 1, 1)
        shifted = torch.cat([x[:, :1], x[:, 1:] - zeros.unsqueeze(1)], dim=1)
        rgb = torch.einsum("ck,bkhw->bchw", torch.from_numpy(YCBCR_TO_RGB).to(device), shifted)
        return rgb.clamp_(0.0, 1.0)
    if channels == 1:
        return (x * torch.from_numpy(LUMA).to(device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    return x


def resize(planes: torch.Tensor, height: int, width: int, *, decimate: bool) -> torch.Tensor:
    """Antialiased bilinear resize (``align_corners=False``), as the reference.

    With ``decimate``, a downscale by 4x or more first averages k x k blocks, k keeping
    the intermediate at least twice the target; the resize then samples the same source
    positions (the scale is given exactly, not recomputed from the intermediate's size).
    """
    import torch.nn.functional as F  # noqa: N812

    rows, cols = planes.shape[-2:]
    if (rows, cols) == (height, width):
        return planes
    kh, kw = max(1, rows // (2 * height)), max(1, cols // (2 * width))
    if not decimate or max(kh, kw) < 2:
        return F.interpolate(
            planes, size=(height, width), mode="bilinear", antialias=True, align_corners=False
        )
    pooled = F.avg_pool2d(planes, (kh, kw), ceil_mode=True)  # a partial last block averages what it has
    # 1 + 1e-9: the output size is floor(pooled size * scale), which must not round below the target
    scale = (height * kh / rows * (1 + 1e-9), width * kw / cols * (1 + 1e-9))
    out = F.interpolate(
        pooled, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False,
        recompute_scale_factor=False,
    )  # fmt: skip
    return out[..., :height, :width]


def _planes(
    kind: str, ops: tuple[_Op, ...], frames: list[RawFrame], channels: int, device: torch.device
) -> torch.Tensor:
    """One chunk of a group as (b, 1 or ``channels``, H, W) in [0, 1], before resizing."""
    if kind == "planes":
        planes = _upload([f.pixels for f in frames], device)
    elif kind in ("colour", "ycbcr"):
        planes = _colour(frames, channels, device)
    else:
        planes = _grayscale(frames, ops, device)
    check_channels(planes.shape[1], channels)
    return planes


def to_batch(
    frames: Sequence[RawFrame],
    spec: InputSpec,
    recipe: Preprocessing,
    device: torch.device,
    *,
    decimate: bool | None = None,
) -> torch.Tensor:
    """The device side: model inputs from :func:`raw_frames`, computed in batches on ``device``.

    Frames of the same shape, dtype and windowing are stacked and processed together,
    at most :data:`CHUNK_VALUES` values at a time (:data:`CPU_CHUNK_VALUES` on the
    CPU); on CUDA integers cross in pinned memory without blocking. Matches
    :func:`workers.preprocess.preprocess` within :data:`TOLERANCE`.

    Args:
        frames: from :func:`raw_frames`, for this ``spec`` and ``recipe``; any mix of
            instances, shapes and dtypes.
        spec: the model's input shape.
        recipe: the model's normalisation.
        device: where the batch is made and returned.
        decimate: average blocks before large downscales; by default on the CPU
            only, and only for frames of :data:`DECIMATE_PIXELS` or more, where it
            saves time (elsewhere the exact resize costs little).

    Returns:
        A contiguous float32 tensor ``(len(frames), spec.channels, spec.height,
        spec.width)`` on ``device``, row i made from ``frames[i]``.

    Raises:
        ModelError: ``mean``/``std`` or a frame's planes do not fit ``spec.channels``.
    """
    import torch

    device = torch.device(device)
    on_cpu = device.type == "cpu"
    chunk_values = CPU_CHUNK_VALUES if on_cpu else CHUNK_VALUES
    mean, std = (
        torch.from_numpy(v).to(device).view(1, -1, 1, 1) for v in normalisation(recipe, spec.channels)
    )
    out = torch.empty(
        (len(frames), spec.channels, spec.height, spec.width), dtype=torch.float32, device=device
    )
    groups: dict[tuple[str, tuple[_Op, ...], tuple[int, ...], str], list[int]] = {}
    for index, frame in enumerate(frames):
        if frame.ready:
            out[index].copy_(torch.from_numpy(frame.pixels))
        else:
            groups.setdefault(_group_key(frame), []).append(index)
    for (kind, ops, shape, _), indices in groups.items():
        step = max(1, chunk_values // (int(np.prod(shape)) * max(1, len(ops))))
        for start in range(0, len(indices), step):
            chunk = indices[start : start + step]
            planes = _planes(kind, ops, [frames[i] for i in chunk], spec.channels, device)
            large = planes.shape[-2] * planes.shape[-1] >= DECIMATE_PIXELS
            shrink = on_cpu and large if decimate is None else decimate
            planes = resize(planes, spec.height, spec.width, decimate=shrink)
            planes = planes.expand(-1, spec.channels, -1, -1).sub(mean).div_(std)
            out.index_copy_(0, torch.tensor(chunk, device=device), planes)
    return out


def finish_on_host(frames: Sequence[RawFrame], spec: InputSpec, recipe: Preprocessing) -> list[RawFrame]:
    """``frames`` made into finished model inputs here, on the CPU, as :func:`to_batch` makes them.

    What a CPU worker's decode processes run, so that the inference thread only stacks
    small finished inputs (a 2500x2048 CR leaves its process as 0.6 MB, not 10 MB) and
    the work runs in parallel across those processes instead of in the one thread that
    also runs the model. The caller sets torch to one thread per process.
    """
    import torch

    batch = to_batch(frames, spec, recipe, torch.device("cpu"))
    return [RawFrame(row.numpy(), ready=True) for row in batch]
