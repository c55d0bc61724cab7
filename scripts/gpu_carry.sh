#!/usr/bin/env bash
# Make what scripts/gpu_bench.sh needs carried to a GPU host (the lent H200: Python 3.12,
# torch, no network, no Redis), from this machine (x86-64, Debian, pip reaching PyPI):
#
#   .whl/    cp312 / pure wheels of radq's runtime dependencies that host lacks, pinned to the
#            versions the tests pass with here; imagecodecs slimmed to the two codecs radq's
#            plugin uses; py-spy for a profile of the worker with PROFILE=1
#   .redis/  Debian's redis-server with the libraries a stock Ubuntu may lack, and a wrapper
#
# Both are git-ignored through .git/info/exclude. About 21 MiB: with the tracked files (40 MiB)
# the device tool's 64 MiB limit leaves about 3. Usage: bash scripts/gpu_carry.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for path in /.whl/ /.redis/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >>.git/info/exclude
done

# fastapi imports opentelemetry, celery tzlocal; tzdata serves a host without zoneinfo.
# click, typer and typing_extensions are there already, in versions too old for these.
WHEELS=(
    alembic==1.20.1 amqp==5.4.2 annotated_types==0.7.0 billiard==4.3.2 celery==5.7.0 click==8.4.0
    click_didyoumean==0.3.1 click_plugins==1.1.1.2 click_repl==0.4.1 fastapi==0.165.0
    httptools==0.9.0 kombu==5.7.0 mako==1.4.3 opentelemetry_api==1.45.2 prompt_toolkit==3.0.52
    pydantic==2.13.4 pydantic_core==2.46.4 pydantic_settings==2.14.1 pydicom==3.0.2
    pylibjpeg==2.1.0 pylibjpeg_openjpeg==2.6.0 pylibjpeg_rle==2.2.0 python_dotenv==1.2.2
    python_multipart==0.0.34 redis==8.2.0 sqlalchemy==2.1.9 starlette==1.10.0 typer==0.29.2
    typing_extensions==4.16.0 typing_inspection==0.4.2 tzdata==2026.6 tzlocal==5.4.5
    uvicorn==0.55.0 vine==5.1.0 wcwidth==0.7.0
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"

if [[ ${PROFILE:-0} == 1 ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl py_spy==0.4.3
fi

# imagecodecs (workers/codecs.py: libjpeg-turbo 3 for JPEG lossless and extended, OpenJPEG for
# JPEG 2000) is 26 MB with its 70 codecs; the package, its JPEG 8 and JPEG 2000 extensions
# and their libraries are 2.6 MB. The rest of it fails to import, which radq never asks for.
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$tmp" imagecodecs==2026.3.6
wheel=$(ls "$tmp"/imagecodecs-*.whl)
mkdir "$tmp/x" && (cd "$tmp/x" && unzip -q "$wheel" &&
    find imagecodecs -name '_*.so' ! -name '_shared*' ! -name '_imcd.*' ! -name '_jpeg8.*' ! -name '_jpeg2k.*' -delete &&
    find imagecodecs.libs -type f ! -name 'libjpeg-*' ! -name 'libopenjp2-*' ! -name 'liblcms2-*' -delete &&
    rm -rf imagecodecs/licenses imagecodecs/*.pyi && rm -f "$wheel" && zip -q -r -9 "$wheel" .)
rm -f .whl/imagecodecs-*.whl && mv "$wheel" .whl/
rm -rf "$tmp"

# GPU_DECODE=1: nvImageCodec for RADQ_GPU_DECODE too, slimmed to fit the device tool's 64 MiB:
# the cp312 binding and the nvJPEG / nvJPEG2000 extensions only (6 of its 25 MB), plus the
# nvJPEG2000 and nvJPEG libraries (8 MB). The repository's ResNet-18 weights must then stay
# behind (see the README's GPU section).
if [[ ${GPU_DECODE:-0} == 1 ]]; then
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$tmp" nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg2k-cu13==0.11.0.51 \
        nvidia-nvjpeg==13.3.2.43
    mv "$tmp"/nvidia_nvjpeg*.whl .whl/
    wheel=$(ls "$tmp"/nvidia_nvimgcodec_cu13-*.whl)
    mkdir "$tmp/x" && (cd "$tmp/x" && unzip -q "$wheel" &&
        find . -name 'nvimgcodec_impl.cpython-*.so' ! -name '*cpython-312-*' -delete &&
        rm -rf nvidia/nvimgcodec/include nvidia/nvimgcodec/extensions/lib{opencv,tiff,nvtiff,jpeg_turbo,nvbmp,nvpnm}_ext* &&
        rm -f "$wheel" && zip -q -r "$wheel" .)
    mv "$wheel" .whl/
    rm -rf "$tmp"
fi

# redis-server and the shared libraries of its that a stock Ubuntu 24.04 may lack.
if ! command -v redis-server >/dev/null; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
fi
rm -rf .redis && mkdir -p .redis/lib
cp "$(readlink -f "$(command -v redis-server)")" .redis/lib/redis-server
for lib in liblzf.so.1 libjemalloc.so.2 libatomic.so.1; do
    cp "$(ldd .redis/lib/redis-server | awk -v l="$lib" '$1 == l {print $3}')" .redis/lib/
done
cat >.redis/redis-server <<'EOF'
#!/usr/bin/env bash
# redis-server with the libraries beside it in lib/ (the host gives libssl3, libsystemd0, libstdc++).
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$here/lib/redis-server" "$@"
EOF
chmod +x .redis/redis-server .redis/lib/redis-server
du -sh .whl .redis
