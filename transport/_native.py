"""Small C helpers on UCX's C API, compiled once and loaded with ctypes, and the CPython extension of
the hottest calls (shared by every helper).

ucxx 0.52's Python layer lacks some UCX calls (RMA) and costs several Python
calls per message; a helper's C source is compiled once with the system C
compiler against the headers and ``libucp`` of the ``libucx`` wheel and cached
(``$UCXKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/ucxkv``, else ``~/.cache/ucxkv``),
keyed by a hash of its source, the UCX version and the wheel's path.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import LocalUsageError

log = logging.getLogger(__name__)

_lock = threading.Lock()

#: Compiler flags of every helper (part of the cache key).
_CFLAGS = ("-O2", "-shared", "-fPIC")


def _cache_dir() -> Path:
    if os.environ.get("UCXKV_CACHE_DIR"):
        return Path(os.environ["UCXKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ucxkv"


def _build(so: Path, flags: list[str], source: str, what: str) -> None:
    cc = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not cc:
        raise LocalUsageError(f"the {what} needs a C compiler (cc or gcc, or $CC) to build once; none found")
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        src = Path(tmp) / (so.stem + ".c")
        src.write_text(source)
        out = Path(tmp) / so.name
        cmd = [*cc, *_CFLAGS, str(src), *flags, "-o", str(out)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalUsageError(f"building the {what} failed ({' '.join(cmd)}): {exc}") from None
        if res.returncode != 0:
            raise LocalUsageError(f"building the {what} failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
        os.replace(out, so)  # atomic: concurrent builders never see a half-written library
    log.info("built the %s: %s", what, so)


def _cached(name: str, suffix: str, source: str, context: str, flags: list[str], what: str) -> Path:
    """The library built from ``source`` with ``flags`` in the cache, built first if it is not there; its
    name is keyed by the source, ``context`` (what else the build depends on) and the compiler flags."""
    key = hashlib.sha256((source + context + " ".join(_CFLAGS)).encode()).hexdigest()[:16]
    so = _cache_dir() / f"{name}_{key}{suffix}"
    if not so.exists():
        _build(so, flags, source, what)
    return so


def load(name: str, source: str, signatures: dict[str, tuple[Any, list[Any]]], what: str) -> ctypes.CDLL:
    """Build (first time only, about 0.2 s) and load the helper ``name`` from C ``source``.

    ``signatures`` maps each exported function to ``(restype, argtypes)``; they are set on
    the returned library. Raises :class:`LocalUsageError` naming ``what`` when there is no
    compiler, no UCX headers, or the build fails.
    """
    with _lock:
        import libucx

        libucx.load_library()
        ucx_root = Path(libucx.__file__).parent
        if not (ucx_root / "include" / "ucp" / "api" / "ucp.h").exists():
            raise LocalUsageError(f"UCX headers not found under {ucx_root}/include; cannot build the {what}")
        version = (ucx_root / "VERSION.txt").read_text().strip() if (ucx_root / "VERSION.txt").exists() else "?"
        so = _cached(name, ".so", source, version + str(ucx_root), [
            f"-I{ucx_root / 'include'}", f"-L{ucx_root / 'lib'}", "-lucp", "-lucs", f"-Wl,-rpath,{ucx_root / 'lib'}"],
            what)
        h = ctypes.CDLL(str(so))
        for fname, (res, args) in signatures.items():
            fn = getattr(h, fname)
            fn.restype, fn.argtypes = res, args
        return h


def load_extension(name: str, source: str, what: str) -> ModuleType:
    """Build (first time only) and import the CPython extension module ``name`` from C ``source``, which
    defines ``PyInit_<name>``; it is built against this Python's headers and links nothing else.

    Raises :class:`LocalUsageError` naming ``what`` when there is no compiler, this Python has no
    headers (``Python.h``), or the build fails.
    """
    with _lock:
        include = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(include, "Python.h")):
            raise LocalUsageError(f"the {what} needs this Python's headers (Python.h, not in {include}; "
                                  "on Debian: the python3-dev package)")
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        so = _cached(name, suffix, source, sys.version + include, [f"-I{include}"], what)
        loader = importlib.machinery.ExtensionFileLoader(name, str(so))
        spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod
