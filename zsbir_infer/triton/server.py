"""Find, install and run ``tritonserver`` on a model repository (loopback by default).

Where the server comes from, in this order:

1. ``$ZSBIR_TRITONSERVER``: the ``tritonserver`` binary (or a folder holding ``bin/tritonserver``); its backends
   are ``$ZSBIR_TRITON_BACKENDS``, else the ``backends/`` folder beside ``bin/`` (the layout of the NGC image,
   ``/opt/tritonserver``).
2. The copy unpacked from the PyPI wheel ``nvidia-pytriton`` by :func:`install_tritonserver`
   (``python -m zsbir_infer.triton install``) into ``$ZSBIR_CACHE_DIR`` (default ``~/.cache/zsbir``). The wheel
   holds a real Triton 2.51 with the Python backend only; its Python package pins numpy<2, so it is unpacked,
   never installed into zsbir's environment.
3. An installed ``pytriton`` package (the same files), used in place.

The Python backend runs each ``model.py`` in a stub process linked against ``libpython3.X``; the wheel has one
stub per Python version, and :func:`prepare` puts the one of *this* interpreter in the backend folder
(``$LD_LIBRARY_PATH`` gets the folder of its ``libpython``). That stub is built with a pybind11 that predates
numpy 2: with numpy 2 every tensor it hands a model reads as its first element repeated (the arrays get stride
0), so the models cannot use this environment's packages when it has numpy 2. They run with a small package
folder of their own instead, :func:`model_env_dir` (numpy<2, pillow, onnxruntime, usearch, numkong: installed
by ``python -m zsbir_infer.triton install`` with ``pip install --target``), plus this zsbir, linked into a
per-server folder; ``$ZSBIR_PYTHONPATH`` lists both (the stub ignores ``$PYTHONPATH``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import zsbir_infer
from zsbir_infer.triton import TritonError

__all__ = [
    "PYTRITON_VERSION",
    "TritonInstall",
    "TritonServer",
    "cache_dir",
    "find_tritonserver",
    "free_port_block",
    "install_model_env",
    "install_tritonserver",
    "model_env_dir",
    "python_path",
]

#: The nvidia-pytriton release whose server zsbir unpacks (Triton 2.51.0).
PYTRITON_VERSION = "0.7.0"
_WHEEL_MEMBERS = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")
_MISSING = (
    "tritonserver not found. Install the one from the nvidia-pytriton wheel (55 MB from PyPI, unpacked into {cache}) "
    "with `python -m zsbir_infer.triton install` (`make install` does it), or point $ZSBIR_TRITONSERVER at a "
    "tritonserver binary (e.g. /opt/tritonserver/bin/tritonserver in the NGC image)"
)


def cache_dir() -> Path:
    """``$ZSBIR_CACHE_DIR``, else ``$XDG_CACHE_HOME/zsbir``, else ``~/.cache/zsbir``."""
    env = os.environ.get("ZSBIR_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "zsbir"


def _wheel_dir() -> Path:
    return cache_dir() / f"tritonserver-pytriton-{PYTRITON_VERSION}"


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and its backend folder."""

    binary: Path
    backends: Path
    #: Folder of per-Python-version Python backend stubs (the pytriton wheel's layout), if any.
    stubs: Path | None = None
    source: str = ""

    @property
    def has_onnxruntime(self) -> bool:
        """Whether the ONNX Runtime backend is installed (``backends/onnxruntime``)."""
        return (self.backends / "onnxruntime").is_dir()

    @property
    def has_python(self) -> bool:
        """Whether the Python backend is installed."""
        return (self.backends / "python").is_dir()


def _from_root(root: Path, source: str) -> TritonInstall | None:
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    stubs = root / "python_backend_stubs"
    return TritonInstall(binary, root / "backends", stubs if stubs.is_dir() else None, source)


def find_tritonserver() -> TritonInstall:
    """The server to run (see the module docstring); raises :class:`TritonError` saying how to get one."""
    env = os.environ.get("ZSBIR_TRITONSERVER")
    if env:
        p = Path(env)
        if p.is_dir():
            found = _from_root(p, "$ZSBIR_TRITONSERVER")
            if found is None:
                raise TritonError(f"$ZSBIR_TRITONSERVER={env} is a folder without bin/tritonserver")
            return found
        if not p.is_file() or not os.access(p, os.X_OK):
            raise TritonError(f"$ZSBIR_TRITONSERVER={env} is not an executable tritonserver binary")
        backends = Path(os.environ.get("ZSBIR_TRITON_BACKENDS") or p.resolve().parent.parent / "backends")
        stubs = p.resolve().parent.parent / "python_backend_stubs"
        return TritonInstall(p, backends, stubs if stubs.is_dir() else None, "$ZSBIR_TRITONSERVER")
    cached = _from_root(_wheel_dir() / "pytriton" / "tritonserver", f"nvidia-pytriton {PYTRITON_VERSION} (unpacked)")
    if cached is not None:
        return cached
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            found = _from_root(Path(loc) / "tritonserver", "the installed pytriton package")
            if found is not None:
                return found
    raise TritonError(_MISSING.format(cache=_wheel_dir()))


def install_tritonserver(
    wheel: str | os.PathLike[str] | None = None, *, log: Callable[[str], Any] | None = None
) -> TritonInstall:
    """Unpack ``tritonserver`` from the ``nvidia-pytriton`` wheel into the cache (once); returns it.

    ``wheel``: a downloaded wheel file; ``None`` runs ``pip download nvidia-pytriton==VERSION --no-deps`` (PyPI, or
    wherever pip is configured to look). Only the server's files are extracted; nothing is installed into the
    Python environment. The folder appears complete or not at all (unpacked beside it, then renamed).
    """
    say = log or (lambda _m: None)
    dst = _wheel_dir()
    if _from_root(dst / "pytriton" / "tritonserver", "") is not None:
        say(f"tritonserver already unpacked in {dst}")
        return find_tritonserver_in(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zsbir-pytriton-", dir=dst.parent) as tmp:
        if wheel is None:
            say(f"downloading nvidia-pytriton=={PYTRITON_VERSION} (about 55 MB) ...")
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp]
            cmd.append(f"nvidia-pytriton=={PYTRITON_VERSION}")
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("nvidia_pytriton-*.whl"))
            if done.returncode != 0 or not wheels:
                raise TritonError(
                    f"could not download nvidia-pytriton=={PYTRITON_VERSION} (pip said: "
                    f"{(done.stderr or done.stdout).strip()[-500:]}); download the wheel elsewhere and pass it with "
                    "`python -m zsbir_infer.triton install --wheel FILE`"
                )
            wheel = wheels[0]
        out = Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.infolist() if m.filename.startswith(_WHEEL_MEMBERS)]
                if not any(m.filename.endswith("bin/tritonserver") for m in members):
                    raise TritonError(f"{wheel} holds no pytriton/tritonserver/bin/tritonserver")
                for m in members:
                    target = out / m.filename
                    if ".." in Path(m.filename).parts:
                        raise TritonError(f"{wheel}: refusing the member {m.filename!r}")
                    if m.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as fh:
                        shutil.copyfileobj(src, fh)
                    mode = (m.external_attr >> 16) & 0o777
                    os.chmod(target, mode or 0o644)
        except (OSError, zipfile.BadZipFile) as exc:
            raise TritonError(f"cannot unpack {wheel}: {exc}") from None
        (out / "pytriton" / "tritonserver" / "bin" / "tritonserver").chmod(0o755)
        for stub in (out / "pytriton" / "tritonserver" / "python_backend_stubs").glob("*/triton_python_backend_stub"):
            stub.chmod(0o755)
        try:
            out.rename(dst)
        except OSError:
            if _from_root(dst / "pytriton" / "tritonserver", "") is None:  # not another installer winning the race
                raise
    say(f"unpacked tritonserver into {dst}")
    return find_tritonserver_in(dst)


def find_tritonserver_in(root: Path) -> TritonInstall:
    """The install unpacked under ``root`` (as :func:`install_tritonserver` lays it out)."""
    found = _from_root(root / "pytriton" / "tritonserver", f"nvidia-pytriton {PYTRITON_VERSION} (unpacked)")
    if found is None:
        raise TritonError(f"{root} holds no unpacked tritonserver")
    return found


#: What the Python-backend models import (numpy below 2: see the module docstring).
MODEL_ENV_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.24,<2",
    "pillow>=10.0",
    "onnxruntime>=1.17",
    "usearch>=2.9",
    "numkong>=7.8",
    "simplejpeg>=1.7",
)
#: The import names of :data:`MODEL_ENV_REQUIREMENTS`: a folder missing one of them is installed again.
MODEL_ENV_PACKAGES: tuple[str, ...] = ("numpy", "PIL", "onnxruntime", "usearch", "numkong", "simplejpeg")


def model_env_dir() -> Path:
    """The package folder the Python-backend models run with, for this Python version."""
    return cache_dir() / f"triton-models-python{sys.version_info.major}.{sys.version_info.minor}"


def install_model_env(*, log: Callable[[str], Any] | None = None) -> Path:
    """``pip install --target`` :data:`MODEL_ENV_REQUIREMENTS` into :func:`model_env_dir` (once); returns it."""
    say = log or (lambda _m: None)
    dst = model_env_dir()
    missing = [p for p in MODEL_ENV_PACKAGES if not (dst / p).is_dir()]
    if not missing:
        say(f"the models' packages are already in {dst}")
        return dst
    if dst.exists():
        say(f"{dst} lacks {', '.join(missing)}: installing the models' packages again")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zsbir-triton-env-", dir=dst.parent) as tmp:
        out = Path(tmp) / "env"
        say(f"installing {', '.join(MODEL_ENV_REQUIREMENTS)} into {dst} (about 250 MB) ...")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location", "--disable-pip-version-check"]
        done = subprocess.run([*cmd, "--target", str(out), *MODEL_ENV_REQUIREMENTS], capture_output=True, text=True)
        if done.returncode != 0 or not (out / "numpy").is_dir():
            raise TritonError(
                "could not install the Triton models' packages (pip said: "
                f"{(done.stderr or done.stdout).strip()[-500:]})"
            )
        old = Path(tmp) / "old"
        if dst.exists():
            dst.rename(old)  # removed with the temporary folder
        try:
            out.rename(dst)
        except OSError:
            if not all((dst / p).is_dir() for p in MODEL_ENV_PACKAGES):  # another process put a full one there
                raise
    return dst


def python_path(link_dir: Path) -> list[str]:
    """``sys.path`` entries of the Python-backend models: ``link_dir`` (made to hold a link to this zsbir_infer)
    and :func:`model_env_dir` when it exists."""
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / "zsbir_infer"
    if not link.exists():
        link.symlink_to(Path(zsbir_infer.__file__).resolve().parent, target_is_directory=True)
    entries = [str(link_dir)]
    if model_env_dir().is_dir():
        entries.append(str(model_env_dir()))
    return entries


def prepare(install: TritonInstall) -> None:
    """Make the Python backend run *this* interpreter's version: copy its stub into ``backends/python``.

    Servers that bring their own stub (no ``python_backend_stubs`` folder: the NGC image) are left alone."""
    if install.stubs is None or not install.has_python:
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = install.stubs / version / "triton_python_backend_stub"
    if not src.is_file():
        have = ", ".join(sorted(p.name for p in install.stubs.iterdir())) or "none"
        raise TritonError(f"this tritonserver has no Python backend stub for Python {version} (it has {have})")
    dst = install.backends / "python" / "triton_python_backend_stub"
    if dst.is_file() and dst.read_bytes() == src.read_bytes():
        return
    tmp = dst.with_name(f".stub.{os.getpid()}")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o755)
    tmp.replace(dst)


def _libpython_dir() -> str | None:
    libdir = sysconfig.get_config_var("LIBDIR")
    ld = sysconfig.get_config_var("LDLIBRARY")
    if libdir and ld and (Path(libdir) / f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0").exists():
        return str(libdir)
    return None


def free_port_block(n: int = 3, host: str = "127.0.0.1", *, tries: int = 200) -> int:
    """A port P such that P .. P+n-1 are free on ``host`` now (a :class:`TritonServer` takes three: HTTP, gRPC,
    metrics). Another process may still take one before the server binds it.

    Raises:
        TritonError: no such block was found in ``tries`` random picks between 20000 and 60000.
    """
    import random
    import socket

    for _ in range(tries):
        base = random.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise TritonError(f"no {n} consecutive free ports on {host}")


class TritonServer:
    """A ``tritonserver`` process on ``repository``: HTTP on ``port``, gRPC on ``port + 1``, metrics on ``port + 2``
    (:func:`free_port_block` finds three free ones).

    ::

        with TritonServer(repo, port=8000) as server:   # starts it and waits until it is ready
            ...                                        # server.http_url, server.grpc_url, server.metrics_url
                                                       # leaving the block stops it (SIGINT, then SIGKILL)
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        install: TritonInstall | None = None,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """Describe the server; :meth:`start` (or ``with``) runs it."""
        self.repository = Path(repository).resolve()
        self.host = host
        self.port = port
        self.install = install or find_tritonserver()
        self.log_file = Path(log_file) if log_file is not None else None
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._link_dir: Path | None = None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (the form tritonclient takes)."""
        return f"{self._shown}:{self.port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self._shown}:{self.port + 1}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics URL."""
        return f"http://{self._shown}:{self.port + 2}/metrics"

    @property
    def _shown(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def command(self) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends}",
            f"--http-address={self.host}",
            f"--http-port={self.port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.port + 1}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.port + 2}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",  # then open keep-alive connections are dropped
            # Two servers on one machine must not share the Python backend's shared-memory regions.
            f"--backend-config=python,shm-region-prefix-name=zsbir_{uuid.uuid4().hex[:12]}_",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: this one, plus ``ZSBIR_PYTHONPATH`` and the ``libpython`` folder."""
        env = dict(os.environ)
        if self._link_dir is None:
            self._link_dir = Path(tempfile.mkdtemp(prefix="zsbir-triton-path-"))
        extra = [p for p in env.get("ZSBIR_PYTHONPATH", "").split(os.pathsep) if p]
        env["ZSBIR_PYTHONPATH"] = os.pathsep.join([*extra, *(p for p in python_path(self._link_dir) if p not in extra)])
        libdir = _libpython_dir()
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        env.update(self.env)
        return env

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Start the server and wait until ``/v2/health/ready`` answers 200; raises :class:`TritonError`
        with the end of its log when it exits or does not become ready in ``timeout`` seconds."""
        if self.proc is not None:
            raise TritonError("the server is already running")
        prepare(self.install)
        if self.install.stubs is not None and not model_env_dir().is_dir():
            raise TritonError(
                f"the Python models of this tritonserver need their own packages (numpy<2) in {model_env_dir()}: "
                "run `python -m zsbir_infer.triton install`"
            )
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="zsbir-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self._log_fh = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server in order
            )
        except OSError as exc:
            self._log_fh.close()
            raise TritonError(f"cannot start {self.install.binary}: {exc}") from None
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll readiness until ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise TritonError(f"tritonserver exited (status {code}) before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TritonError(f"tritonserver was not ready after {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        if self.log_file is None or not self.log_file.is_file():
            return ""
        text = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def wait(self) -> int:
        """Wait for the server to exit; returns its status."""
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop the server: SIGINT (Triton unloads its models and exits), SIGKILL after ``timeout`` s."""
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # the server and its Python-backend stubs
                    proc.wait(5)
            code = proc.returncode
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a server that died
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._link_dir is not None:
            shutil.rmtree(self._link_dir, ignore_errors=True)
            self._link_dir = None
        return code

    def __enter__(self) -> TritonServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
