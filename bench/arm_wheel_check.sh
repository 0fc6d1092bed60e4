#!/bin/sh
# Does a cross-compiled llama-cpp-python wheel run on a given Arm core? Installs WHEEL into the
# emulated Debian 12 arm64 root the tests cache (tests/support/arm.py; run tests/test_arm_device.py
# once to make it), loads a Q8_0 GGUF (quantized kernels: where dotprod/i8mm code would run) and
# embeds one sentence under `qemu-aarch64-static -cpu QEMU_CPU`. A wheel built for a newer core
# dies with SIGILL (signal 4) on an older one.
#   sh bench/arm_wheel_check.sh WHEEL QEMU_CPU GGUF WHEELHOUSE
# WHEELHOUSE: aarch64 cp311 wheels of numpy, diskcache, jinja2, markupsafe, typing_extensions
# (pip download --only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.11 ...).
set -u
WHEEL="$1"; CPU="$2"; GGUF="$3"; WH="$4"
ROOT_CACHE="${HOME}/.cache/edgepack-test-arm"
SRC="$(find "${ROOT_CACHE}" -mindepth 2 -maxdepth 2 -name root -type d | head -n 1)"
[ -n "${SRC}" ] || { echo "no cached arm64 root under ${ROOT_CACHE}: run tests/test_arm_device.py" >&2; exit 2; }
R="${TMPDIR:-/tmp}/edgepack-arm-wheel-check"
arm() { cpu="$1"; shift; PROOT_NO_SECCOMP=1 proot -0 -q "qemu-aarch64-static -cpu ${cpu}" -r "${R}" -b /dev -b /proc -w / "$@"; }
if [ ! -x "${R}/opt/v/bin/python" ]; then
  rm -rf "${R}"; cp -a "${SRC}" "${R}"
  mkdir -p "${R}/tmp/wh"; cp "${WH}"/*.whl "${R}/tmp/wh/"
  arm cortex-a53 /usr/bin/python3 -m venv /opt/v
  arm cortex-a53 /opt/v/bin/pip install -q --no-index --find-links /tmp/wh numpy diskcache jinja2 typing_extensions
fi
cp "${GGUF}" "${R}/tmp/m.gguf"
rm -rf "${R}/opt/l" "${R}/tmp/w"; mkdir -p "${R}/tmp/w"; cp "${WHEEL}" "${R}/tmp/w/"
arm cortex-a53 /opt/v/bin/pip install -q --no-deps --target /opt/l "/tmp/w/$(basename "${WHEEL}")"
PYTHONPATH=/opt/l arm "${CPU}" /opt/v/bin/python -c "
import llama_cpp
l = llama_cpp.Llama('/tmp/m.gguf', embedding=True, n_ctx=64, verbose=False)
v = l.embed('The capital of France is Paris.')
print('embedding ok: dim', len(v), 'sum of squares', round(sum(x * x for x in v), 4))
"
rc=$?
echo "rc=${rc} cpu=${CPU} wheel=${WHEEL}"
exit ${rc}
