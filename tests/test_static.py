"""Static file-safety inspection: malicious pickles are reported without ever running them."""

from __future__ import annotations

import collections
import fractions
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from timm_purify.detection import Finding, UnsafeFileError, assert_safe, inspect_files


class Payload:
    """Pickles as a call to os.system(command): what a booby-trapped checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def critical(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "critical"]


def state_dict() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    return collections.OrderedDict(
        w=torch.randn(4, 3, generator=g), b=torch.zeros(4, dtype=torch.bfloat16), n=torch.tensor(3)
    )


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "a payload ran during inspection"


def test_raw_malicious_pickle_is_critical_and_never_runs(tmp_path: Path, sentinel: Path) -> None:
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"weights": [1.0], "x": Payload(f"touch {sentinel}")}))

    findings = inspect_files(evil)

    unsafe = [f for f in findings if f.kind == "unsafe-import"]
    assert unsafe and unsafe[0].severity == "critical"
    assert "unsafe import posix.system" in unsafe[0].message or "unsafe import nt.system" in unsafe[0].message
    assert not sentinel.exists()
    with pytest.raises(UnsafeFileError, match="posix.system|nt.system"):
        assert_safe(findings)
    # the payload is real: an ordinary unpickler runs it (in a throwaway interpreter)
    subprocess.run(
        [sys.executable, "-c", f"import pickle; pickle.load(open({str(evil)!r}, 'rb'))"], check=True
    )
    assert sentinel.exists()
    sentinel.unlink()


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "torch-legacy"])
def test_torch_save_with_payload_is_critical(tmp_path: Path, sentinel: Path, zipped: bool) -> None:
    evil = tmp_path / "pytorch_model.bin"
    obj = {**state_dict(), "extra": Payload(f"touch {sentinel}")}
    torch.save(obj, evil, _use_new_zipfile_serialization=zipped)

    findings = inspect_files(evil)

    assert any(f.kind == "unsafe-import" and "system" in f.message for f in critical(findings))
    if zipped:
        assert zipfile.is_zipfile(evil) and "data.pkl" in critical(findings)[0].message


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "torch-legacy"])
def test_clean_torch_state_dict_has_no_critical_finding(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "model.pth"
    torch.save(state_dict(), path, _use_new_zipfile_serialization=zipped)
    findings = inspect_files(path)
    assert critical(findings) == [] and [f.severity for f in findings] == ["info"]
    assert findings[0].kind == "pickle" and "5 distinct import(s), 5 on the allow-list" in findings[0].message
    assert_safe(findings)


def _ops(*parts: bytes) -> bytes:
    return b"\x80\x04" + b"".join(parts) + b"."  # PROTO 4 ... STOP


def _str(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()  # SHORT_BINUNICODE


def test_stack_global_through_the_memo_is_resolved(tmp_path: Path) -> None:
    # 'os' and 'system' are memoised and popped; two decoy strings are pushed last; the import
    # then takes its operands back from the memo. A scanner that pairs the last two strings
    # would report the harmless collections.OrderedDict.
    stream = _ops(
        _str("os"),
        b"q\x00",  # BINPUT 0
        b"0",  # POP
        _str("system"),
        b"q\x01",
        b"0",
        _str("collections"),
        _str("OrderedDict"),
        b"0",
        b"0",
        b"h\x00",  # BINGET 0
        b"h\x01",
        b"\x93",  # STACK_GLOBAL
        _str("echo hi"),
        b"\x85",  # TUPLE1
        b"R",  # REDUCE
    )
    path = tmp_path / "memo.pkl"
    path.write_bytes(stream)
    messages = [f.message for f in critical(inspect_files(path))]
    assert any("unsafe import os.system" in m for m in messages)
    assert not any("OrderedDict" in m for m in messages)


def test_memoize_opcode_and_dotted_names_are_resolved(tmp_path: Path) -> None:
    # torch has an attribute 'os': STACK_GLOBAL('torch', 'os.system') reaches os.system
    path = tmp_path / "dotted.pkl"
    path.write_bytes(_ops(_str("torch"), b"\x94", _str("os.system"), b"\x94", b"\x93", _str("id"), b"\x85R"))
    assert any("torch.os.system" in f.message for f in critical(inspect_files(path)))


def test_computed_import_is_critical(tmp_path: Path) -> None:
    path = tmp_path / "dynamic.pkl"
    path.write_bytes(_ops(b"K\x01", _str("system"), b"\x93"))  # STACK_GLOBAL(1, 'system')
    assert [f.kind for f in critical(inspect_files(path))] == ["dynamic-import"]


def test_protocol_0_python2_names_are_mapped(tmp_path: Path) -> None:
    path = tmp_path / "old.pkl"
    path.write_bytes(b"c__builtin__\neval\n(S'1+1'\ntR.")
    assert any("builtins.eval" in f.message for f in critical(inspect_files(path)))


def test_unknown_import_is_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "frac.pkl"
    path.write_bytes(pickle.dumps({"lr": fractions.Fraction(1, 3)}))
    findings = inspect_files(path)
    assert critical(findings) == []
    assert [(f.severity, f.kind) for f in findings] == [("warning", "unknown-import"), ("info", "pickle")]
    assert "fractions.Fraction" in findings[0].message
    assert_safe(findings)  # warnings do not refuse


def test_malformed_pickle_is_critical(tmp_path: Path) -> None:
    good = pickle.dumps({"a": Payload("true")}, protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(good[:-6])
    kinds = {f.kind for f in critical(inspect_files(path))}
    assert kinds == {"unsafe-import", "malformed"}  # the import before the damage still counts
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01not a pickle at all")
    assert [f.kind for f in critical(inspect_files(garbage))] == ["unrecognised"]


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_torchscript_archive_and_broken_zip(tmp_path: Path) -> None:
    ts = tmp_path / "scripted.pt"
    _zip(ts, {"m/data.pkl": pickle.dumps({}, protocol=2), "m/code/__torch__.py": b"def forward(self): ..."})
    assert [f.kind for f in critical(inspect_files(ts))] == ["torchscript"]

    good = tmp_path / "good.pt"
    torch.save(state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    findings = critical(inspect_files(cut))
    assert [f.kind for f in findings] == ["damaged"] and "download" in findings[0].message


def _legacy_tar(path: Path, *, hidden: bytes | None = None, main: object = None) -> None:
    """A legacy (pre-zip) torch.save tar archive, laid out as torch's legacy_load reads it."""
    storages = io.BytesIO()
    pickle.dump(2 if hidden else 1, storages, protocol=2)
    pickle.dump(("0", "cpu", torch.FloatStorage), storages, protocol=2)
    storages.write(struct.pack("<q", 3) + struct.pack("<3f", 1.0, 2.0, 3.0))  # raw elements
    if hidden:
        storages.write(hidden)  # a second "storage record" that is a payload
        storages.write(struct.pack("<q", 0))
    pickle.dump([], storages, protocol=2)
    tensors = io.BytesIO()
    pickle.dump(0, tensors, protocol=2)
    with tarfile.open(path, "w:") as tar:
        for name, data in (
            ("sys_info", pickle.dumps({"little_endian": True}, protocol=2)),
            ("storages", storages.getvalue()),
            ("tensors", tensors.getvalue()),
            ("pickle", pickle.dumps(main if main is not None else {"w": 1}, protocol=2)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_legacy_tar_archive_is_walked_past_raw_storage_bytes(tmp_path: Path, sentinel: Path) -> None:
    clean = tmp_path / "clean.tar"
    _legacy_tar(clean)
    findings = inspect_files(clean)
    assert critical(findings) == []
    assert {f.kind for f in findings} == {"legacy-format", "pickle"}

    hidden = tmp_path / "hidden.tar"
    _legacy_tar(hidden, hidden=pickle.dumps(Payload(f"touch {sentinel}"), protocol=2))
    assert any("system" in f.message for f in critical(inspect_files(hidden)))


def _safetensors_raw(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def test_safetensors_good_and_truncated(tmp_path: Path) -> None:
    good = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(5, dtype=torch.int64)}, str(good))
    findings = inspect_files(good)
    assert [(f.severity, f.kind) for f in findings] == [("info", "safetensors")]

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-7])
    (finding,) = inspect_files(cut)
    assert (finding.severity, finding.kind) == ("critical", "damaged")
    assert "damaged" in finding.message and "truncated" in finding.message and "download" in finding.message
    with pytest.raises(UnsafeFileError, match="damaged"):
        assert_safe([finding])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x05\x00", "shorter than the 8-byte header"),
        (struct.pack("<Q", 4096) + b"{}", "only 2 bytes follow"),
        (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
        (
            _safetensors_raw({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "unknown dtype",
        ),
        (
            _safetensors_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "needs 8 bytes",
        ),
        (
            _safetensors_raw(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                },
                b"\0" * 8,
            ),
            "overlaps",
        ),
        (
            _safetensors_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4),
            "unused bytes",
        ),
        (
            _safetensors_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 6),
            "belong to no",
        ),
        (_safetensors_raw({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ],
    ids=["short", "header-past-end", "bad-json", "dtype", "size", "overlap", "gap", "trailing", "metadata"],
)
def test_safetensors_header_problems(tmp_path: Path, raw: bytes, expected: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    (finding,) = inspect_files(path)
    assert finding.severity == "critical" and finding.kind == "damaged"
    assert expected in finding.message


def test_folder_is_searched_recursively_by_extension(tmp_path: Path, sentinel: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_file({"a": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "sub" / "opt.ckpt").write_bytes(pickle.dumps(Payload(f"touch {sentinel}")))
    (tmp_path / "notes.json").write_text("not a model file")
    (tmp_path / "README.md").write_bytes(pickle.dumps(Payload(f"touch {sentinel}")))  # not scanned
    findings = inspect_files(tmp_path)
    assert {Path(f.file).name for f in findings} == {"model.safetensors", "opt.ckpt"}
    assert [Path(f.file).name for f in critical(findings)] == ["opt.ckpt"]
    assert findings[0].to_dict().keys() == {"severity", "file", "kind", "message"}
    with pytest.raises(FileNotFoundError):
        inspect_files(tmp_path / "missing")
