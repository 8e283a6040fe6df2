"""Inspect model files for safety before a single weight is loaded.

Two families of files carry timm weights:

* **safetensors**: an 8-byte little-endian header length, a JSON header, then raw bytes.
  Reading one cannot run code, but a truncated download or a crafted header makes loaders
  fail late or read out of bounds, so the header is checked against the file on its own.
* **pickle-based files** (``torch.save`` zip archives, the legacy non-zip format, legacy
  tar archives, raw pickles): unpickling *imports and calls* whatever the stream names, which
  is how a checkpoint runs ``os.system`` on load. These files are never unpickled here:
  :func:`pickletools.genops` walks the opcode stream, a small stack simulation recovers the
  ``(module, name)`` of every import (``GLOBAL``, ``INST``, and ``STACK_GLOBAL`` whose
  operands are strings pushed directly or fetched back from the memo), and each import is
  compared with an allow-list of the data constructors ``torch.save`` and ``numpy`` use.

Findings have a severity (``info``, ``warning``, ``critical``) and a ``kind``:

=================  ========  =============================================================
kind               severity  meaning
=================  ========  =============================================================
``safetensors``    info      header consistent with the file
``pickle``         info      pickle-based file whose imports are all on the allow-list
``damaged``        critical  truncated or corrupt file (safetensors header, zip archive)
``unsafe-import``  critical  an import that runs code, touches the system or is a gadget
``unknown-import`` warning   an import that is neither allowed nor known to be dangerous
``dynamic-import`` critical  an import whose name is computed while unpickling
``malformed``      critical  an opcode stream that cannot be parsed (damaged or crafted)
``torchscript``    critical  a TorchScript archive: it holds code that runs on load
``unrecognised``   critical  a file that is neither safetensors nor a known pickle format
                   (a warning for a zip archive without ``data.pkl``)
``legacy-format``  warning   a legacy tar checkpoint ``torch.load(weights_only=True)`` refuses
=================  ========  =============================================================

:func:`inspect_files` only reports; :func:`assert_safe` turns critical findings into an
:class:`UnsafeFileError`. A warning is not refused by :func:`assert_safe`: timm-purify loads
pickles only through ``torch.load(weights_only=True)``, which rejects every import outside
torch's own allow-list, so the scan is a first line that explains *why* a file is unsafe.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import json
import math
import os
import pickletools
import struct
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "Finding",
    "UnsafeFileError",
    "inspect_files",
    "assert_safe",
    "SCANNED_EXTENSIONS",
    "PICKLE_EXTENSIONS",
    "is_pickle_file",
]

SCANNED_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".pth.tar")

# The safetensors format caps its header at 100 MB; a larger claim is a damaged or hostile file.
_MAX_HEADER_BYTES = 100_000_000
# A data.pkl of a very large model is a few MB; refuse to pull gigabytes of "pickle" into memory.
_MAX_PICKLE_BYTES = 1 << 30
# First pickle of the legacy (non-zip) torch.save format.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# Bits per element of every dtype the safetensors format defines.
_DTYPE_BITS = {
    **dict.fromkeys(("F4",), 4),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"), 8),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("C64", "F64", "I64", "U64"), 64),
}

# ---------------------------------------------------------------------------------------
# Allow-list. Every entry is a class used only as a type marker, or a function that builds
# plain data from plain arguments: none calls an argument, imports, or touches the system.
# ---------------------------------------------------------------------------------------
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [
        # torch.save pickles every tensor as a call to one of these: they view a storage
        # (fetched through persistent_load, never through an import) with a size, stride and
        # dtype. The same set is allowed by torch.load(weights_only=True).
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch._utils", "_rebuild_sparse_tensor"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"),
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"),
        # Rebuilds a tensor subclass: calls a function and sets a class that are themselves
        # imports of the same stream, hence checked against this list on their own.
        ("torch._tensor", "_rebuild_from_type_v2"),
        # Maps a layout name ("torch.sparse_coo") to the layout object (sparse tensors).
        ("torch.serialization", "_get_layout"),
        # Plain value types: a shape tuple, a device name, the tensor and parameter classes.
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        # Dict subclasses: state dicts are OrderedDicts, some training logs use Counter.
        ("collections", "OrderedDict"),
        ("collections", "Counter"),
        # Protocol 2 encodes bytes as _codecs.encode(text, "latin1"): string to bytes only.
        ("_codecs", "encode"),
        # timm training checkpoints store their argparse arguments; Namespace only sets
        # attributes (timm's own torch.load allows it as a safe global for that reason).
        ("argparse", "Namespace"),
        # numpy arrays and scalars: _reconstruct allocates an empty array of a class given as
        # another (checked) import, scalar builds a number from a dtype and raw bytes.
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    ]
    # Containers and numbers built from plain values (the opcodes build most of them, but
    # protocols 0-2 reach a few through the builtins module).
    + [
        ("builtins", n)
        for n in ("set", "frozenset", "slice", "range", "complex", "bytearray", "bool", "int", "float")
        + ("tuple", "list", "dict")
    ]
)


@functools.lru_cache(maxsize=1)
def _torch_markers() -> frozenset[tuple[str, str]]:
    """dtypes, quantisation schemes, storage and tensor classes of the installed torch.

    These are constants and classes used as type markers by ``torch.save`` (a storage is
    pickled as ``torch.FloatStorage``, a dtype as ``torch.float32``). The names come from
    torch itself (``vars(torch)``, which never triggers a lazy import), so the list follows
    the installed version; nothing here looks up an attacker-chosen name.
    """
    import torch

    names = {("torch", k) for k, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.qscheme))}
    for cls in (*getattr(torch, "_storage_classes", ()), *getattr(torch, "_tensor_classes", ())):
        names.add((cls.__module__, cls.__name__))
    return frozenset(names)


# Modules whose presence anywhere in an import path means code execution, system access, file
# or network I/O, or a gadget that calls or reaches arbitrary objects (operator.attrgetter,
# functools.partial, types.FunctionType, ...). No state dict needs any of them.
_DANGEROUS_MODULES = frozenset(
    # run commands or Python code
    ("os", "posix", "nt", "subprocess", "pty", "commands", "popen2", "runpy", "code", "codeop", "pydoc")
    + ("timeit", "cProfile", "profile", "trace", "pdb", "bdb", "IPython", "sys", "signal", "webbrowser")
    # import, compile or deserialise code
    + ("importlib", "imp", "pkgutil", "zipimport", "site", "sysconfig", "venv", "ensurepip", "pip")
    + ("setuptools", "distutils", "compileall", "py_compile", "marshal", "pickle", "_pickle", "cPickle")
    + ("cloudpickle", "dill", "joblib", "shelve", "dbm", "yaml", "ctypes", "_ctypes", "cffi")
    # gadgets that call, reach or build arbitrary objects and functions
    + ("types", "operator", "_operator", "functools", "inspect", "gc", "multiprocessing", "concurrent")
    + ("threading", "_thread", "asyncio")
    # files and network
    + ("io", "_io", "pathlib", "tempfile", "glob", "fileinput", "shutil", "zipfile", "tarfile", "gzip")
    + ("bz2", "lzma", "sqlite3", "logging", "socket", "socketserver", "ssl", "urllib", "urllib2")
    + ("urllib3", "requests", "httpx", "http", "httplib", "ftplib", "smtplib", "telnetlib", "xmlrpc")
    + ("poplib", "imaplib", "nntplib")
)

# Qualified names inside otherwise-allowed libraries that load or run code, or write files.
_DANGEROUS_QUALNAMES = (
    ("torch.load", "torch.save", "torch.compile", "torch.jit", "torch.hub", "torch.package", "torch.fx")
    + ("torch.serialization", "torch.utils.cpp_extension", "torch._C", "torch.ops", "torch.classes")
    + ("torch._dynamo", "torch._inductor", "torch.compiler", "torch.export", "torch.distributed")
    + ("torch.multiprocessing", "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed")
    + ("numpy.savetxt", "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap")
    + ("numpy.lib.npyio", "numpy.lib.format", "numpy.f2py", "numpy.distutils", "numpy.testing")
    + ("numpy.ctypeslib",)
)


@dataclass(frozen=True)
class Finding:
    """One observation about one file.

    Attributes:
        severity: ``"info"``, ``"warning"`` or ``"critical"``; critical findings make
            :func:`assert_safe` refuse the file.
        file: path of the file on disk.
        kind: short machine-readable category (see the module docstring).
        message: what was found and what to do about it, for a person.
    """

    severity: str
    file: str
    kind: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class UnsafeFileError(ValueError):
    """Raised by :func:`assert_safe` when a file must not be loaded; ``findings`` lists why."""

    def __init__(self, findings: Iterable[Finding]):
        self.findings = list(findings)
        lines = "\n".join(f"  - [{f.kind}] {f.file}: {f.message}" for f in self.findings)
        super().__init__(
            f"Refusing to load: {len(self.findings)} critical finding(s) in the model files.\n{lines}\n"
            "Nothing was loaded or executed. Do not open these files with torch.load or pickle; get the "
            "model from a source you trust, preferably as safetensors."
        )


def assert_safe(findings: Iterable[Finding]) -> None:
    """Raise :class:`UnsafeFileError` listing every critical finding; do nothing otherwise."""
    critical = [f for f in findings if f.severity == "critical"]
    if critical:
        raise UnsafeFileError(critical)


def inspect_files(path: str | os.PathLike) -> list[Finding]:
    """Inspect a file, or every model file under a folder, without loading any of it.

    A folder is searched recursively for files ending in one of :data:`SCANNED_EXTENSIONS`
    (and ``.pth.tar``); a single file is inspected whatever its name, its format being told
    by its first bytes. Nothing is unpickled and nothing is imported from the files.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist: pass a model file or a folder holding one.")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and _has_scanned_suffix(p))
    else:
        files = [root]
    findings: list[Finding] = []
    for file in files:
        findings.extend(_inspect_one(file))
    return findings


def is_pickle_file(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a pickle-based format (zip/tar/raw pickle), judged by content."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(512)
    kind = _sniff(p, head)
    return kind in ("zip", "tar", "pickle")


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------
def _has_scanned_suffix(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(SCANNED_EXTENSIONS) or name.endswith(".pth.tar")


def _sniff(p: Path, head: bytes) -> str:
    if p.name.lower().endswith(".safetensors"):
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= _MAX_HEADER_BYTES:
        return "safetensors"  # a JSON object right after a plausible header length
    if head[:1] == b"\x80" or p.name.lower().endswith(PICKLE_EXTENSIONS):
        return "pickle"
    return "unknown"


def _inspect_one(p: Path) -> list[Finding]:
    try:
        with open(p, "rb") as fh:
            head = fh.read(512)
    except OSError as err:
        return [Finding("critical", str(p), "unrecognised", f"cannot be read ({err}).")]
    kind = _sniff(p, head)
    if kind == "safetensors":
        return _inspect_safetensors(p)
    if kind == "zip":
        return _inspect_zip(p)
    if kind == "tar":
        return _inspect_tar(p)
    if kind == "pickle":
        return _inspect_raw_pickle(p)
    return [
        Finding(
            "critical",
            str(p),
            "unrecognised",
            "is neither safetensors nor a torch/pickle checkpoint; it cannot be checked, so it is not loaded.",
        )
    ]


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------
def _inspect_safetensors(p: Path) -> list[Finding]:
    size = p.stat().st_size

    def damaged(details: list[str]) -> list[Finding]:
        shown = "; ".join(details[:5]) + (f"; and {len(details) - 5} more" if len(details) > 5 else "")
        return [
            Finding(
                "critical",
                str(p),
                "damaged",
                f"the safetensors file is damaged ({shown}). It is probably truncated or corrupt: "
                "delete it and download (or save) it again.",
            )
        ]

    if size < 8:
        return damaged([f"it is {size} bytes long, shorter than the 8-byte header length"])
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER_BYTES:
            return damaged([f"its header length field says {n} bytes, above the 100 MB the format allows"])
        if n > size - 8:
            return damaged([f"its header claims {n} bytes but only {size - 8} bytes follow"])
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return damaged([f"its header is not valid JSON ({err})"])
    if not isinstance(header, dict):
        return damaged(["its header is not a JSON object"])

    data_size = size - 8 - n
    problems: list[str] = []
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        problems.append("__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            problems.append(f"entry {name!r} is not an object")
            continue
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = _DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            problems.append(f"tensor {name!r} has unknown dtype {dtype!r}")
            continue
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            problems.append(f"tensor {name!r} has an invalid shape {shape!r}")
            continue
        if (
            not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets))
            or offsets[0] > offsets[1]
        ):
            problems.append(f"tensor {name!r} has invalid data_offsets {offsets!r}")
            continue
        begin, end = offsets
        nbits = math.prod(shape) * bits
        if nbits % 8 or nbits // 8 != end - begin:
            problems.append(
                f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbits / 8:g} bytes "
                f"but its data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))

    needed = max((end for _, end, _ in spans), default=0)
    if needed > data_size:
        last = max(spans, key=lambda s: s[1])[2]
        problems.insert(
            0,
            f"tensor {last!r} ends at byte {needed} of the data area but the file holds only "
            f"{data_size} bytes of data: the file is truncated",
        )
    reached = 0
    for begin, end, name in sorted(spans):
        if begin < reached:
            problems.append(f"tensor {name!r} overlaps the tensor before it")
        elif begin > reached:
            problems.append(f"{begin - reached} unused bytes before tensor {name!r}")
        reached = max(reached, end)
    if reached < data_size:
        problems.append(f"{data_size - reached} bytes after the last tensor belong to no tensor")
    if problems:
        return damaged(problems)
    return [
        Finding(
            "info",
            str(p),
            "safetensors",
            f"safetensors header consistent with the file ({len(spans)} tensors, {data_size} bytes of data).",
        )
    ]


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ---------------------------------------------------------------------------------------
# pickle opcode walk
# ---------------------------------------------------------------------------------------
_MARK = object()  # a MARK on the simulated stack
_UNKNOWN = object()  # any value whose content does not matter for imports
_STRING_OPS = frozenset(
    ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8")
)
_INT_OPS = frozenset(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"))


@dataclass
class _PickleWalk:
    """What one pickle (up to its STOP) imports; ``error`` is set if it could not be parsed."""

    imports: list[tuple[str, str]] = field(default_factory=list)
    dynamic: int = 0  # STACK_GLOBAL with operands that are not constant strings
    extension_codes: int = 0  # EXT1/EXT2/EXT4: imports through the copyreg registry
    ints: list[int] = field(default_factory=list)
    error: str | None = None


def _walk_pickle(stream: IO[bytes]) -> _PickleWalk:
    """Simulate the unpickler's stack and memo just enough to name every import.

    Only strings are tracked as values (they are what STACK_GLOBAL consumes); everything
    else is an opaque placeholder. The stack effect of generic opcodes is taken from
    pickletools' opcode table, so a string reaching STACK_GLOBAL through the memo (BINPUT /
    MEMOIZE then BINGET) or DUP is still resolved, and anything else is reported as dynamic.
    """
    walk = _PickleWalk()
    stack: list[object] = []
    memo: dict[int, object] = {}
    proto = 0

    def pop() -> object:
        if not stack or stack[-1] is _MARK:
            walk.error = walk.error or "stack underflow: the stream is not a well-formed pickle"
            return _UNKNOWN
        return stack.pop()

    def pop_mark() -> None:
        while stack:
            if stack.pop() is _MARK:
                return
        walk.error = walk.error or "MARK expected: the stream is not a well-formed pickle"

    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name == "PROTO":
                proto = int(arg)
            elif name in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else _UNKNOWN)
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                walk.imports.append(_fix_import(module, attr, proto))
                if name == "INST":
                    pop_mark()
                stack.append(_UNKNOWN)
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if isinstance(module, str) and isinstance(attr, str):
                    walk.imports.append(_fix_import(module, attr, proto))
                else:
                    walk.dynamic += 1
                stack.append(_UNKNOWN)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1] if stack else _UNKNOWN
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else _UNKNOWN
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg), _UNKNOWN))
            elif name == "DUP":
                stack.append(stack[-1] if stack else _UNKNOWN)
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("EXT1", "EXT2", "EXT4"):
                walk.extension_codes += 1
                stack.append(_UNKNOWN)
            else:
                if name in _INT_OPS and isinstance(arg, int) and not isinstance(arg, bool):
                    walk.ints.append(arg)
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    for _ in range(before.index(pickletools.markobject)):
                        pop()
                else:
                    for _ in before:
                        pop()
                stack.extend(_UNKNOWN for _ in op.stack_after)
    except Exception as err:  # genops raises ValueError and friends on damaged streams
        walk.error = f"{type(err).__name__}: {err}"
    return walk


def _fix_import(module: str, name: str, proto: int) -> tuple[str, str]:
    """Apply the Python 2 renames the unpickler applies to protocols 0-2 (fix_imports)."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return module, name


def _classify(module: str, name: str) -> tuple[str, str] | None:
    """None for an allowed import, else ``(severity, reason)``."""
    if (module, name) in _ALLOWED or (module, name) in _torch_markers():
        return None
    if module in ("numpy.dtypes",) and name.endswith("DType") and name.isidentifier():
        return None  # numpy >= 1.25 dtype classes: type markers only
    qualname = f"{module}.{name}"
    parts = qualname.split(".")
    if parts[0] in _DANGEROUS_MODULES or any(p in _DANGEROUS_MODULES for p in parts[1:]):
        return (
            "critical",
            "it can run commands, load code, touch files or the network, or call arbitrary objects",
        )
    if parts[0] in ("builtins", "__builtin__"):
        return "critical", "only plain container builtins are data; this one can run or reach arbitrary code"
    if any(p.startswith("__") for p in parts[1:]):
        return "critical", "it reaches a dunder attribute, a classic way to climb to arbitrary code"
    if any(qualname == q or qualname.startswith(q + ".") for q in _DANGEROUS_QUALNAMES):
        return "critical", "it loads or runs code, or writes files"
    if module == "__main__":
        return "warning", "a class defined in the script that saved the file, not verifiable"
    return "warning", "it is not on the allow-list of data constructors; it is not known to be dangerous"


def _walk_stream(stream: IO[bytes]) -> list[_PickleWalk]:
    """Walk the pickles of a raw file: one, the five of the legacy format, or a chain."""
    walks = [_walk_pickle(stream)]
    if walks[0].error is not None:
        return walks
    if _LEGACY_MAGIC in walks[0].ints:
        # legacy torch.save: magic, protocol, sys_info, object, storage keys, then raw bytes
        for _ in range(4):
            walks.append(_walk_pickle(stream))
            if walks[-1].error is not None:
                break
        return walks
    while True:  # pickles written back to back (pickle.load reads them one by one)
        pos = stream.tell()
        if stream.read(1) != b"\x80":
            return walks
        stream.seek(pos)
        nxt = _walk_pickle(stream)
        if nxt.error is not None:
            # trailing bytes that are not a pickle: pickle.load stops before them
            return walks
        walks.append(nxt)


def _report(p: Path, fmt: str, walks: list[tuple[str, _PickleWalk]]) -> list[Finding]:
    """Turn the walks of one file's pickles (``(member, walk)`` pairs) into findings."""
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()
    allowed = 0
    for member, walk in walks:
        where = f" (in {member})" if member else ""
        for module, name in walk.imports:
            if (module, name) in seen:
                continue
            seen.add((module, name))
            verdict = _classify(module, name)
            if verdict is None:
                allowed += 1
                continue
            severity, reason = verdict
            kind = "unsafe-import" if severity == "critical" else "unknown-import"
            label = "unsafe import" if severity == "critical" else "unknown import"
            findings.append(Finding(severity, str(p), kind, f"{label} {module}.{name}{where}: {reason}."))
        if walk.dynamic:
            findings.append(
                Finding(
                    "critical",
                    str(p),
                    "dynamic-import",
                    f"{walk.dynamic} import(s){where} whose module or name is computed while unpickling; "
                    "a checkpoint never needs this, a payload hiding its target does.",
                )
            )
        if walk.extension_codes:
            findings.append(
                Finding(
                    "critical",
                    str(p),
                    "dynamic-import",
                    f"{walk.extension_codes} import(s){where} through copyreg extension codes, which name "
                    "no module and cannot be verified.",
                )
            )
        if walk.error is not None:
            findings.append(
                Finding(
                    "critical",
                    str(p),
                    "malformed",
                    f"the pickle stream{where} cannot be parsed ({walk.error}); the file is damaged or crafted "
                    "to hide its content, so it is not loaded.",
                )
            )
    if not any(f.severity == "critical" for f in findings):
        findings.append(
            Finding(
                "info",
                str(p),
                "pickle",
                f"pickle-based file ({fmt}) with {len(seen)} distinct import(s), {allowed} on the allow-list. "
                "Prefer safetensors; timm-purify loads it only with torch.load(weights_only=True).",
            )
        )
    return findings


def _inspect_raw_pickle(p: Path) -> list[Finding]:
    with open(p, "rb") as fh:
        walks = _walk_stream(fh)
    if walks[0].error is not None and not walks[0].imports:
        return [
            Finding(
                "critical",
                str(p),
                "unrecognised",
                f"is neither safetensors nor a readable torch/pickle checkpoint ({walks[0].error}); "
                "it is damaged or not a model file, so it is not loaded.",
            )
        ]
    fmt = "legacy torch.save" if _LEGACY_MAGIC in walks[0].ints else "raw pickle"
    return _report(p, fmt, [("", w) for w in walks])


def _inspect_zip(p: Path) -> list[Finding]:
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            findings: list[Finding] = []
            if any("/code/" in f"/{n}" or n.endswith("constants.pkl") for n in names):
                findings.append(
                    Finding(
                        "critical",
                        str(p),
                        "torchscript",
                        "is a TorchScript archive: it holds compiled code that runs when loaded. Export a "
                        "state dict (safetensors) instead.",
                    )
                )
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                findings.append(
                    Finding(
                        "warning",
                        str(p),
                        "unrecognised",
                        "is a zip archive without data.pkl: not a torch.save checkpoint.",
                    )
                )
            walks: list[tuple[str, _PickleWalk]] = []
            for info in infos:
                if not info.filename.endswith(".pkl"):
                    continue
                if info.file_size > _MAX_PICKLE_BYTES:
                    findings.append(
                        Finding(
                            "critical",
                            str(p),
                            "malformed",
                            f"{info.filename} claims {info.file_size} bytes, too large to be a checkpoint's pickle.",
                        )
                    )
                    continue
                walks.append((info.filename, _walk_pickle(io.BytesIO(zf.read(info)))))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        return [
            Finding(
                "critical",
                str(p),
                "damaged",
                f"the zip archive is damaged ({err}). It is probably truncated or corrupt: delete it and "
                "download (or save) it again.",
            )
        ]
    return findings + _report(p, "torch zip archive", walks)


# Element size of the legacy storage classes, needed to skip their raw bytes in a tar archive.
_LEGACY_ELEMENT_SIZE = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "QInt8Storage": 1,
    "QUInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}


def _walk_tar_member(name: str, stream: IO[bytes]) -> list[_PickleWalk]:
    """Walk the pickles of a legacy tar member, skipping the raw bytes between them.

    ``storages`` is ``count``, then per storage ``(key, location, storage_type)`` followed by
    an int64 element count and the elements, then the view list; ``tensors`` is ``count``,
    then per tensor a pickle followed by ndim, sizes, strides and offset. Other members are
    single pickles.
    """
    walks = [_walk_pickle(stream)]
    if name not in ("storages", "tensors") or walks[0].error is not None:
        return walks
    count = walks[0].ints[-1] if walks[0].ints else -1
    if not 0 <= count <= 10_000_000:
        walks[0].error = f"invalid record count in {name}"
        return walks
    for _ in range(count):
        walk = _walk_pickle(stream)
        walks.append(walk)
        if walk.error is not None:
            return walks
        if name == "storages":
            kinds = [n for _, n in walk.imports if n in _LEGACY_ELEMENT_SIZE]
            raw = stream.read(8)
            if not kinds or len(raw) < 8:
                walk.error = "storage record without a known storage type or size"
                return walks
            (numel,) = struct.unpack("<q", raw)
            stream.seek(numel * _LEGACY_ELEMENT_SIZE[kinds[-1]], io.SEEK_CUR)
        else:
            raw = stream.read(8)
            if len(raw) < 8:
                walk.error = "tensor record truncated"
                return walks
            (ndim,) = struct.unpack("<i", raw[:4])
            stream.seek(16 * max(ndim, 0) + 8, io.SEEK_CUR)
    if name == "storages":
        walks.append(_walk_pickle(stream))
    return walks


def _inspect_tar(p: Path) -> list[Finding]:
    walks: list[tuple[str, _PickleWalk]] = []
    try:
        with tarfile.open(p, mode="r:") as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is not None:  # streamed: the raw storage bytes are skipped, not read
                    walks.extend((member.name, w) for w in _walk_tar_member(member.name, extracted))
    except (tarfile.TarError, OSError, EOFError) as err:
        return [
            Finding(
                "critical",
                str(p),
                "damaged",
                f"the tar archive is damaged ({err}): delete it and download (or save) it again.",
            )
        ]
    legacy = Finding(
        "warning",
        str(p),
        "legacy-format",
        "is a legacy tar checkpoint, which torch.load(weights_only=True) cannot read; re-save it as "
        "safetensors with a trusted tool.",
    )
    return [legacy, *_report(p, "legacy tar archive", walks)]
