"""Shared pieces of the `dsmoe` commands: one-line errors, argument types, device and output-folder checks.

Every user error ends as one line on stderr (``<prog>: error: <what>``) and an exit status: 2 for an
argument that is wrong in itself (argparse's convention), 1 for a request this machine cannot serve (no
GPU, no CUDA build). Checks run before anything is created, so a refused command leaves no trace.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

USAGE, UNAVAILABLE = 2, 1


class CLIError(Exception):
    """A user error: ``str(e)`` is the message, ``e.code`` the exit status."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage block is what `--help` is for)."""

    def error(self, message):
        self.exit(USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def run(prog: str, fn, *args, **kwargs) -> int:
    """Calls ``fn``; a CLIError or Ctrl-C becomes one line on stderr and its exit status."""
    try:
        return fn(*args, **kwargs)
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def seed_int(s: str) -> int:
    # torch seeds are 64-bit and the trainer also seeds seed + 1
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {s!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {v}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s}")
    return v


def _build_archs() -> list[int]:
    """Compute capabilities (e.g. 90) the native module has kernels for; [] when unknown."""
    from . import _native

    C = _native.native()
    archs = str(C.build_info.get("cuda_archs", "")) if C is not None else ""
    out = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        digits = "".join(ch for ch in a if ch.isdigit())
        if digits:
            out.append(int(digits))
    return out


def resolve_device(arg: str | None, prog: str, option: str = "--device"):
    """The torch device for ``--device`` (``cpu``, ``cuda``, ``cuda:N``); None picks a usable GPU, else the CPU
    (saying so on stderr when a GPU is visible but unusable).

    CUDA tensors run dsmoe's compiled kernels (there is no CUDA fallback), so ``cuda`` needs a CUDA build
    of ``dsmoe._C``, a visible device, and a device the build has kernels for."""
    import torch

    if arg is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        problem = cuda_problem(torch.device("cuda"))
        if problem is None:
            return torch.device("cuda")
        print(f"{prog}: note: not using the GPU: {problem}; running on the CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise CLIError(f"{option}: expected cpu, cuda or cuda:N, got {arg!r}")
    if dev.type == "cuda":
        problem = cuda_problem(dev)
        if problem is not None:
            raise CLIError(f"{option} {arg}: {problem}", UNAVAILABLE)
    return dev


def cuda_problem(dev=None) -> str | None:
    """Why dsmoe cannot run on CUDA device ``dev`` (default: the current one) here, or None if it can."""
    import torch

    from . import _native

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        return "no CUDA device is visible to torch"
    if _native.native() is None:
        why = _native._IMPORT_ERROR
        return "the compiled module dsmoe._C is missing" + (f" ({why})" if why else "")
    if not _native.cuda_compiled():
        return "dsmoe._C was built without CUDA kernels (no nvcc at build time); rebuild with nvcc"
    index = torch.cuda.current_device() if dev is None or dev.index is None else dev.index
    n = torch.cuda.device_count()
    if index >= n:
        return f"device index {index} does not exist ({n} CUDA device{'s' if n != 1 else ''} visible)"
    major, minor = torch.cuda.get_device_capability(index)
    archs = _build_archs()
    if archs and major * 10 + minor not in archs:
        return (f"{torch.cuda.get_device_name(index)} is sm_{major}{minor}; this build has kernels for "
                + ", ".join(f"sm_{a}" for a in archs))
    return None


def check_out_dir(path: str, option: str = "--out", files=(), dirs=()) -> str:
    """Checks that ``path`` can become (or already is) a folder this command may write ``files`` and ``dirs``
    into, creating nothing. Returns the path."""
    if not path:
        raise CLIError(f"{option}: expected a folder path, got an empty string")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{option} {path}: exists and is not a folder")
    if os.path.isdir(path):
        for name in files:
            p = os.path.join(path, name)
            if os.path.isdir(p):
                raise CLIError(f"{option} {path}: {p} is a folder where this command writes a file")
        for name in dirs:
            p = os.path.join(path, name)
            if os.path.exists(p) and not os.path.isdir(p):
                raise CLIError(f"{option} {path}: {p} is a file where this command writes a folder")
        probe_in = [path] + [os.path.join(path, d) for d in dirs if os.path.isdir(os.path.join(path, d))]
    else:
        # the nearest existing ancestor is where the folder will be created
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise CLIError(f"{option} {path}: {parent} is a file, not a folder")
        probe_in = [parent]
    for d in probe_in:
        # os.access is wrong for root and for read-only mounts; creating (and removing) a folder is not
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dsmoe-write-check-", dir=d))
        except OSError as e:
            raise CLIError(f"{option} {path}: cannot create files in {d} ({e.strerror or e})") from None
    return path
