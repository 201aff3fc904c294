#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU machine that cannot download anything: the packages fednnunet needs
# at run time that such a machine's image lacks (it has PyTorch, numpy, scipy, scikit-image, pandas, matplotlib,
# httpx, grpcio, protobuf, ...), for its Python (3.12 by default), as one archive, .whl/wheels.tar.xz, which
# gpu_check.sh unpacks and installs. Versions are this repository's constraints.txt (fednnunet itself runs from
# src/). The archive travels with the repository, at most 64 MiB in all: the wheels as downloaded take 83 MiB
# (SimpleITK alone 50 MiB), so they are re-zipped without compression and the whole set is compressed with xz
# (about 48 MiB; pip installs stored wheels as it installs deflated ones). Takes about 3 minutes on 2 cores.
#
#   scripts/gpu_wheels.sh [PYTHON_VERSION]      e.g. scripts/gpu_wheels.sh 3.12
#
# Left out on purpose: what a run does not import (uv, MedPy, imagecodecs, dicom and notebook helpers of the
# dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
NEEDED=(nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures simpleitk nibabel
        connected-components-3d blosc2 ndindex numexpr yacs graphviz future linecache2 traceback2 unittest2
        flwr cryptography cffi pycparser pycryptodome iterators tomli-w grpcio-health-checking fastapi starlette
        uvicorn pydantic pydantic-core annotated-types typing-inspection sqlalchemy alembic mako greenlet)
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in "${NEEDED[@]}"; do
  pin=$(grep -i -E "^${name//-/[-_]}==" constraints.txt || true)
  pins+=("${pin:-$name}")
done
for pin in "${pins[@]}"; do  # a binary wheel for the target; a pure-Python one built here where only an sdist exists
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin" 2>/dev/null \
  || python3 -m pip wheel -q --no-deps -w .whl "$pin" 2>/dev/null \
  || { echo "no wheel for $pin" >&2; exit 1; }
done
for w in .whl/*.whl; do  # a wheel built here must be pure Python, or it would not run there
  case "$w" in *-none-any.whl|*manylinux*|*cp${PYVER/./}*) ;; *) echo "not portable: $w" >&2; exit 1;; esac
done
python3 - <<'PY'
import glob, os, zipfile
for wheel in glob.glob(".whl/*.whl"):  # stored, not deflated: xz then compresses across all of them
    stored = wheel + ".stored"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename), compress_type=zipfile.ZIP_STORED)
    os.replace(stored, wheel)
PY
count=$(ls .whl/*.whl | wc -l)
tar -C .whl -cf - $(cd .whl && ls *.whl) | xz -9e -T0 > .whl/wheels.tar.xz.part
mv .whl/wheels.tar.xz.part .whl/wheels.tar.xz
rm .whl/*.whl
total=$(stat -c %s .whl/wheels.tar.xz)
echo "$count wheels in .whl/wheels.tar.xz: $((total / 1048576)) MiB (the repository travels with it; limit 64 MiB)"
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "too large to carry with the repository in one go" >&2; exit 1
fi
