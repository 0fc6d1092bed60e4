#!/bin/sh
# Install this edgepack bundle on this device, offline:  sudo sh install.sh [options]
# Needs only python3 and python3-venv (Raspberry Pi OS and Ubuntu ship python3; if venv is
# missing: sudo apt install python3-venv). Options are those of `edgepack install`
# (--prefix, --state-dir, --no-user, --systemd auto|write|no, --port ...; --help lists them).
#
# 1. every file of the bundle is checked against manifest.json with python3's hashlib;
# 2. edgepack's installer then runs from the verified edgepack wheel in runtime/wheels
#    (a wheel is a zip, which python3 imports from): it makes the venv from the pack with
#    no index, creates the edgepack user, places the bundle and installs the systemd units.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}

if ! command -v "$py" >/dev/null 2>&1; then
  echo "install.sh: $py not found; install it (sudo apt install python3 python3-venv)" >&2
  exit 3
fi
if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "install.sh: $py has no venv/ensurepip module; sudo apt install python3-venv" >&2
  exit 3
fi

# Exit 6 naming each file that does not match (the same check as `edgepack verify`).
"$py" - "$here" <<'PY'
import hashlib, json, os, sys
root = sys.argv[1]
try:
    m = json.load(open(os.path.join(root, "manifest.json"), encoding="utf-8"))
    files = m["files"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(print(f"install.sh: {root}/manifest.json is missing or damaged ({e})",
                   file=sys.stderr) or 6)
bad = []
for f in files:
    rel = f["path"]
    p = os.path.join(root, rel)
    if rel.startswith("/") or ".." in rel.split("/") or os.path.islink(p) or not os.path.isfile(p):
        bad.append(f"{rel}: missing or not a regular file")
        continue
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != f["sha256"]:
        bad.append(f"{rel}: sha256 does not match the manifest")
if bad:
    print("install.sh: the bundle does not match its manifest:\n  " + "\n  ".join(bad),
          file=sys.stderr)
    sys.exit(6)
PY

# A glob, not ls: no output parsing, and one program fewer.
wheel=""
for w in "$here"/runtime/wheels/edgepack-*.whl; do
  if [ -f "$w" ]; then wheel=$w; break; fi
done
if [ -z "$wheel" ]; then
  echo "install.sh: this bundle has no runtime pack (runtime/wheels/edgepack-*.whl);" \
       "rebuild it with: edgepack build ... --runtime" >&2
  exit 3
fi
PYTHONPATH="$wheel" exec "$py" -m edgepack.install "$here" "$@"
