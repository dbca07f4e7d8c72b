"""llama.cpp as a reference runtime for our GGUF exports.

llama.cpp is built from the source distribution of ``llama-cpp-python`` on PyPI, which vendors one
exact llama.cpp commit together with Python bindings made for that commit, so the C library and the
bindings can never drift apart:

* :func:`ensure_llama_cpp` downloads the pinned sdist (``pip download``), extracts it, configures
  ``vendor/llama.cpp`` with CMake and builds only the requested targets plus the shared ``llama``
  library (by default ``llama-bench``, ``llama-quantize`` and ``mtmd``, the multimodal library that
  runs mmproj files; a target is a tool or, like ``mtmd``, a shared library), then caches the
  result under ``~/.cache/edgerazor/llama.cpp/<version>-<hash>`` (``$EDGERAZOR_LLAMA_CPP_DIR``
  replaces ``~/.cache/edgerazor/llama.cpp``).  The build happens in a temporary directory next to
  the cache entry and is renamed into place, under a file lock, so a killed build never leaves a
  half-built entry and two processes never build the same entry twice.
* :func:`find_llama_cpp` returns the cached build or ``None``; it never builds (tests use it to
  decide whether to skip).
* :func:`install_llama_cpp_python` installs the ``llama_cpp`` Python package from the same sdist with
  ``CMAKE_ARGS=-DLLAMA_BUILD=OFF``: only the Python files are installed, no second copy of llama.cpp
  is compiled.  ``llama_cpp`` loads ``libllama`` from ``$LLAMA_CPP_LIB_PATH``
  (``llama_cpp/llama_cpp.py``), which :func:`import_llama_cpp` points at our build.
* :func:`llama_cpp_logits` / :func:`llama_cpp_tokenize` run a GGUF file through llama.cpp.

Build choices.  ``GGML_NATIVE=OFF``: a ``-march=native`` build restored from a CI cache onto a
runner with a different CPU can die with SIGILL, and different SIMD paths (AVX-512 vs AVX2) round
differently, so results would depend on the runner.  On x86-64 the build targets AVX2/FMA/F16C
(llama.cpp's default when not native) when the CPU has them, baseline x86-64 otherwise; the ISA set is
part of the cache key.  ``native=True`` (or ``EDGERAZOR_LLAMA_CPP_NATIVE=1``) opts into a
``-march=native`` build, keyed by the CPU's flags.  Shared libraries (``BUILD_SHARED_LIBS=ON``) with
an ``$ORIGIN`` rpath, so binaries and libraries live in one relocatable directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from edgerazor.errors import EdgeRazorError

#: The llama-cpp-python release whose sdist provides llama.cpp and its bindings.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: ``mtmd`` is llama.cpp's multimodal library (a shared library, no tool): it runs our mmproj files.
DEFAULT_TARGETS: tuple[str, ...] = ("llama-bench", "llama-quantize", "mtmd")
#: Targets that are shared libraries rather than tools.
_LIBRARY_TARGETS = frozenset({"mtmd"})
#: Bumped whenever the way we build changes, so old cache entries are not reused.
_BUILD_RECIPE_VERSION = 1
_MANIFEST = "manifest.json"
# Shared libraries the Python bindings (and every tool) need next to each other.
_REQUIRED_LIBS = ("llama", "ggml", "ggml-base", "ggml-cpu")


class LlamaCppError(EdgeRazorError):
    """llama.cpp could not be downloaded, built, found or run."""


def _log(msg: str) -> None:
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def _shared_lib_name(base: str) -> str:
    if sys.platform == "win32":
        return f"{base}.dll"
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    return f"lib{base}.so"


def _exe_name(base: str) -> str:
    return f"{base}.exe" if sys.platform == "win32" else base


@dataclass(frozen=True)
class LlamaCpp:
    """A llama.cpp build: its tools in ``bin_dir`` and its shared libraries in ``lib_dir``."""

    root: Path
    bin_dir: Path
    lib_dir: Path
    version: str
    targets: tuple[str, ...]
    manifest: dict = field(default_factory=dict, compare=False, repr=False)

    def binary(self, name: str) -> Path:
        path = self.bin_dir / _exe_name(name)
        if not path.is_file():
            raise LlamaCppError(
                f"{name} was not built in {self.root} (built: {', '.join(self.targets)}); "
                f"call ensure_llama_cpp(targets=(..., {name!r}))"
            )
        return path

    @property
    def llama_bench(self) -> Path:
        return self.binary("llama-bench")

    @property
    def llama_quantize(self) -> Path:
        return self.binary("llama-quantize")

    @property
    def libllama(self) -> Path:
        return self.lib_dir / _shared_lib_name("llama")

    def env(self, base: dict | None = None) -> dict:
        """An environment for running the tools or the Python bindings against this build."""
        env = dict(os.environ if base is None else base)
        env["LLAMA_CPP_LIB_PATH"] = str(self.lib_dir)
        var = {"darwin": "DYLD_LIBRARY_PATH", "win32": "PATH"}.get(sys.platform, "LD_LIBRARY_PATH")
        env[var] = os.pathsep.join(p for p in (str(self.lib_dir), env.get(var, "")) if p)
        return env


# --------------------------------------------------------------------------------------------------
# Cache location and key


def cache_root() -> Path:
    """Where builds are cached: ``$EDGERAZOR_LLAMA_CPP_DIR`` or ``~/.cache/edgerazor/llama.cpp``."""
    override = os.environ.get("EDGERAZOR_LLAMA_CPP_DIR")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerazor" / "llama.cpp"


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _native_default() -> bool:
    return os.environ.get("EDGERAZOR_LLAMA_CPP_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")


def _cmake_args(native: bool) -> list[str]:
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_CURL=OFF",  # deprecated in this llama.cpp (replaced by LLAMA_OPENSSL); kept explicit
        "-DLLAMA_OPENSSL=OFF",  # no network code: we only load local files
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_COMMON=ON",
        "-DGGML_BACKEND_DL=OFF",
        "-DGGML_CUDA=OFF",
        "-DGGML_VULKAN=OFF",
        "-DGGML_METAL=OFF",  # CPU only: the reference numerics we compare against
        "-DGGML_BLAS=OFF",
        # One relocatable directory: binaries find the shared libraries next to them.
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=" + ("@loader_path" if sys.platform == "darwin" else "$ORIGIN"),
    ]
    args.append(f"-DGGML_NATIVE={'ON' if native else 'OFF'}")
    machine = platform.machine().lower()
    if not native and machine in ("x86_64", "amd64"):
        flags = _cpu_flags()
        # llama.cpp's non-native x86 default is SSE4.2+AVX+AVX2+BMI2+FMA+F16C (x86-64-v3). Turn it
        # all off on a CPU without it (or when /proc/cpuinfo is unreadable and we cannot tell).
        v3 = {"avx", "avx2", "bmi2", "fma", "f16c", "sse4_2"}
        on = "ON" if v3 <= flags else "OFF"
        args += [f"-DGGML_{f}={on}" for f in ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C")]
    return args


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        return "no-c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return cxx
    return f"{cxx}: {out.splitlines()[0] if out else ''}"


def _cache_key(version: str, native: bool) -> tuple[str, dict]:
    ident = {
        "recipe": _BUILD_RECIPE_VERSION,
        "llama_cpp_python": version,
        "cmake_args": _cmake_args(native),
        "platform": sys.platform,
        "machine": platform.machine(),
        "compiler": _compiler_id(),
        "cc": os.environ.get("CC", ""),
        "cflags": os.environ.get("CFLAGS", ""),
        "cxxflags": os.environ.get("CXXFLAGS", ""),
    }
    if native:
        ident["cpu_flags"] = sorted(_cpu_flags())
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"{version}-{digest}", ident


def _target_file(bin_dir: Path, target: str) -> Path:
    """The file a target builds: a tool's executable or a library's shared object."""
    return bin_dir / (_shared_lib_name(target) if target in _LIBRARY_TARGETS else _exe_name(target))


def _load_entry(path: Path) -> LlamaCpp | None:
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    bin_dir = path / "bin"
    if not all((bin_dir / _shared_lib_name(lib)).exists() for lib in _REQUIRED_LIBS):
        return None
    targets = tuple(t for t in manifest.get("targets", []) if _target_file(bin_dir, t).is_file())
    return LlamaCpp(
        root=path,
        bin_dir=bin_dir,
        lib_dir=bin_dir,
        version=manifest.get("llama_cpp_python", "?"),
        targets=targets,
        manifest=manifest,
    )


def find_llama_cpp(
    targets: Iterable[str] = (),
    *,
    cache_dir: str | os.PathLike | None = None,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    native: bool | None = None,
) -> LlamaCpp | None:
    """The cached build with (at least) ``targets``, or ``None``. Never downloads or builds."""
    native = _native_default() if native is None else native
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    key, _ = _cache_key(version, native)
    entry = _load_entry(root / key)
    if entry is None or not set(targets) <= set(entry.targets):
        return None
    return entry


# --------------------------------------------------------------------------------------------------
# Download, extract, build


def _sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def download_sdist(dest: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama-cpp-python sdist in ``dest`` (downloaded with pip unless already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / _sdist_name(version)
    if path.is_file() and tarfile.is_tarfile(path):
        return path
    local = os.environ.get("EDGERAZOR_LLAMA_CPP_SDIST")  # an already downloaded sdist (offline machines)
    if local:
        local_path = Path(local).expanduser()
        if local_path.name != path.name or not tarfile.is_tarfile(local_path):
            raise LlamaCppError(f"$EDGERAZOR_LLAMA_CPP_SDIST={local} is not {path.name}")
        _log(f"using the sdist {local_path}")
        tmp_copy = dest / f".{path.name}.{os.getpid()}.tmp"
        shutil.copyfile(local_path, tmp_copy)
        os.replace(tmp_copy, path)
        return path
    _log(f"downloading llama-cpp-python=={version} (sdist) into {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        cmd = [
            sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
            "--no-binary", ":all:", "--no-deps", "-d", str(tmp),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise LlamaCppError(
                f"pip download of llama-cpp-python=={version} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        os.replace(found[0], path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract(sdist: Path, dest: Path) -> Path:
    """Extract the sdist into ``dest``; returns its top directory (holding ``vendor/llama.cpp``)."""
    with tarfile.open(sdist) as tar:
        members = tar.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1:
            raise LlamaCppError(f"unexpected layout of {sdist}: top-level entries {sorted(tops)[:5]}")
        # The vocab test files under vendor/llama.cpp/models are large and unused by the build.
        keep = [m for m in members if "/vendor/llama.cpp/models/" not in m.name + "/" or m.isdir()]
        try:
            tar.extractall(dest, members=keep, filter="data")
        except TypeError:  # Python without tarfile extraction filters
            for m in keep:
                if m.name.startswith(("/", "..")) or "/../" in m.name or m.issym() or m.islnk():
                    raise LlamaCppError(f"refusing suspicious member {m.name!r} in {sdist}")
            tar.extractall(dest, members=keep)
    top = dest / tops.pop()
    if not (top / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise LlamaCppError(f"{sdist} does not contain vendor/llama.cpp")
    return top


def _run_streamed(
    cmd: Sequence[str], *, cwd: Path | None = None, log_path: Path | None = None, env: dict | None = None
) -> None:
    """Run ``cmd`` echoing its output (prefixed) and keeping the tail for the error message."""
    _log("$ " + " ".join(str(c) for c in cmd))
    tail: list[str] = []
    log = open(log_path, "a") if log_path else contextlib.nullcontext()
    with log as lf:
        proc = subprocess.Popen(
            [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1,
        )  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            if lf is not None:
                lf.write(line)
            tail.append(line)
            del tail[:-60]
            print("    " + line.rstrip(), file=sys.stderr, flush=True)
        rc = proc.wait()
    if rc != 0:
        raise LlamaCppError(f"command failed (exit {rc}): {' '.join(map(str, cmd))}\n" + "".join(tail))


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still protects the cache entry
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"another process is building llama.cpp ({path}); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(
    root: Path, key: str, ident: dict, targets: tuple[str, ...], jobs: int, version: str, native: bool
) -> LlamaCpp:
    if shutil.which("cmake") is None:
        raise LlamaCppError("building llama.cpp needs cmake on PATH (and a C/C++ compiler)")
    t0 = time.monotonic()
    sdist = download_sdist(root / "sdist", version)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    try:
        _log(f"extracting {sdist.name}")
        src = _extract(sdist, staging / "src")
        build = staging / "build"
        log_path = staging / "build.log"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run_streamed(
            ["cmake", "-S", src / "vendor" / "llama.cpp", "-B", build, *generator, *_cmake_args(native)],
            log_path=log_path,
        )
        all_targets = ("llama", *targets)
        _log(f"building {', '.join(all_targets)} with {jobs} job(s); this takes a while")
        _run_streamed(
            ["cmake", "--build", build, "--config", "Release", "--parallel", str(jobs), "--target", *all_targets],
            log_path=log_path,
        )
        built_bin = build / "bin"
        if sys.platform == "win32" and (built_bin / "Release").is_dir():
            built_bin = built_bin / "Release"
        shutil.move(str(built_bin), staging / "bin")
        shutil.move(str(log_path), staging / "bin" / "build.log")
        shutil.rmtree(build)
        shutil.rmtree(staging / "src")
        manifest = {
            **ident,
            "targets": list(targets),
            "sdist": sdist.name,
            "sdist_sha256": _sha256(sdist),
            "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if _load_entry(staging) is None:
            raise LlamaCppError(f"build finished but shared libraries are missing in {staging / 'bin'}")
        final = root / key
        old = None
        if final.exists():  # an entry lacking some targets: swap it out (we hold the lock)
            old = root / f".old-{key}-{os.getpid()}"
            os.rename(final, old)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    entry = _load_entry(final)
    assert entry is not None
    _log(f"built in {time.monotonic() - t0:.0f}s -> {final}")
    return entry


def ensure_llama_cpp(
    cache_dir: str | os.PathLike | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    jobs: int = 2,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    native: bool | None = None,
) -> LlamaCpp:
    """The cached llama.cpp build with ``targets``, downloading and building it if needed.

    ``cache_dir`` replaces :func:`cache_root`. A cached entry that lacks some of ``targets`` is
    rebuilt with the union of its targets and the requested ones.
    """
    native = _native_default() if native is None else native
    targets = tuple(dict.fromkeys(targets))
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    key, ident = _cache_key(version, native)
    entry = _load_entry(root / key)
    if entry is not None and set(targets) <= set(entry.targets):
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{key}.lock"):
        entry = _load_entry(root / key)  # someone else may have built it while we waited
        if entry is not None and set(targets) <= set(entry.targets):
            return entry
        wanted = tuple(dict.fromkeys((*(entry.targets if entry else ()), *targets)))
        return _build(root, key, ident, wanted, max(1, int(jobs)), version, native)


# --------------------------------------------------------------------------------------------------
# Python bindings (the llama_cpp package, without its own copy of llama.cpp)


def _installed_bindings_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def install_llama_cpp_python(llama: LlamaCpp | None = None, *, python: str | None = None) -> None:
    """Install the ``llama_cpp`` Python package of the pinned version without compiling llama.cpp.

    ``CMAKE_ARGS=-DLLAMA_BUILD=OFF`` makes the package's CMake project build nothing, so only the
    Python files are installed; at import time :func:`import_llama_cpp` points them at our build.
    """
    python = python or sys.executable
    version = llama.version if llama is not None else LLAMA_CPP_PYTHON_VERSION
    if python == sys.executable and _installed_bindings_version() == version:
        return
    sdist = llama.root.parent / "sdist" / _sdist_name(version) if llama is not None else None
    spec = str(sdist) if sdist is not None and sdist.is_file() else f"llama-cpp-python=={version}"
    env = dict(os.environ)
    env["CMAKE_ARGS"] = "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"
    env.pop("FORCE_CMAKE", None)
    _log(f"installing the llama_cpp Python package ({spec}) without building llama.cpp")
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a wheel built elsewhere with its own
    # llama.cpp could otherwise be reused.
    _run_streamed([
        python, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
        spec,
    ], env=env)  # fmt: skip
    # Its runtime dependencies (numpy and jinja2 are usually present already; diskcache is not).
    _run_streamed([
        python, "-m", "pip", "install",
        "typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "jinja2>=2.11.3",
    ])  # fmt: skip
