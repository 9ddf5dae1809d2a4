#!/usr/bin/env python3
"""Check a fastpeft wheel's CUDA extension: SASS for exactly the requested GPU architectures,
no dynamic dependency on the CUDA runtime or libtorch, a build record (fastpeft/_build_info.json)
that names the CUDA version and the same architectures, and (with --manylinux) a manylinux platform
tag, the kind PyPI accepts (an unrepaired `linux_x86_64` wheel is refused by PyPI).

    python tools/check_wheel.py dist/fastpeft-*.whl --expect 80,90 [--expect-ptx 90] [--manylinux]

Lists the cubins with `cuobjdump --list-elf` (found on PATH, under CUDA_HOME, or from the
nvidia-cuda-cuobjdump package); where there is none, reads the ELF's .nv_fatbin section itself
(the same list; --require-cuobjdump makes a missing cuobjdump an error).  Exit status 0 when the
wheel matches, 1 when it does not, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def parse_archs(spec: str) -> list[int]:
    """"80,90", "8.0;9.0" or "8.0 9.0+PTX" -> [80, 90]."""
    archs = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d+)\.?(\d)(\+PTX)?", entry, flags=re.IGNORECASE)
        if m is None:
            raise SystemExit(f"check_wheel: {entry!r} is not an architecture like 80, 8.0 or sm_80")
        archs.append(int(m.group(1)) * 10 + int(m.group(2)))
    return sorted(set(archs))


def find_cuobjdump() -> str | None:
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    for entry in sys.path:  # pip install nvidia-cuda-cuobjdump puts it in site-packages/nvidia/cu*/bin
        candidates += [str(p) for p in sorted(Path(entry).glob("nvidia/cu*/bin/cuobjdump"))] if entry else []
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def list_with_cuobjdump(cuobjdump: str, so: Path) -> tuple[list[int], list[int]]:
    def run(flag: str) -> str:
        proc = subprocess.run([cuobjdump, flag, str(so)], capture_output=True, text=True)
        if proc.returncode != 0 and "No PTX" not in proc.stderr + proc.stdout and "does not contain" not in proc.stderr:
            raise SystemExit(f"check_wheel: {cuobjdump} {flag} failed:\n{proc.stderr}")
        return proc.stdout

    sass = [int(a) for a in re.findall(r"\.sm_(\d+)[a-z]?\.cubin", run("--list-elf"))]
    ptx = [int(a) for a in re.findall(r"\.sm_(\d+)[a-z]?\.ptx", run("--list-ptx"))]
    return sass, ptx


def _sections(data: bytes) -> dict[str, tuple[int, int]]:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit("check_wheel: not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    out = {}
    for h in headers:
        name = data[strtab + h[0]: data.index(b"\0", strtab + h[0])].decode()
        out[name] = (h[4], h[5])  # file offset, size
    return out


def list_with_fatbin_reader(so: Path) -> tuple[list[int], list[int]]:
    """The cubins (kind 2) and PTX (kind 1) of the .nv_fatbin section: each container is a
    16-byte header (magic 0xBA55ED50, version, header size, payload size) and entries whose
    header holds kind at offset 0, header size at 4, payload size at 8 and the SM at 28."""
    data = so.read_bytes()
    sections = _sections(data)
    if ".nv_fatbin" not in sections:
        return [], []
    off, size = sections[".nv_fatbin"]
    sass, ptx = [], []
    p = off
    while p + 16 <= off + size:
        magic, _, header, payload = struct.unpack_from("<IHHQ", data, p)
        if magic != 0xBA55ED50:
            p += 8  # containers are 8-byte aligned
            continue
        q = p + header
        while q < p + header + payload:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, q)
            arch, = struct.unpack_from("<I", data, q + 28)
            (sass if kind == 2 else ptx).append(arch)
            q += entry_header + entry_size
        p += header + payload
    return sass, ptx


def needed_libraries(so: Path) -> list[str]:
    """DT_NEEDED entries of the shared object."""
    data = so.read_bytes()
    sections = _sections(data)
    dyn_off, dyn_size = sections[".dynamic"]
    str_off, _ = sections[".dynstr"]
    needed = []
    for i in range(0, dyn_size, 16):
        tag, val = struct.unpack_from("<qQ", data, dyn_off + i)
        if tag == 0:
            break
        if tag == 1:
            needed.append(data[str_off + val: data.index(b"\0", str_off + val)].decode())
    return needed


def wheel_tags(name: str) -> tuple[str, str, str]:
    """(python, abi, platform) tags of a wheel file name (`fastpeft-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl`)."""
    parts = name[:-len(".whl")].split("-") if name.endswith(".whl") else []
    if len(parts) not in (5, 6):
        raise SystemExit(f"check_wheel: {name} is not a wheel file name (NAME-VERSION-PY-ABI-PLATFORM.whl)")
    return parts[-3], parts[-2], parts[-1]


def manylinux_problem(platform: str) -> str | None:
    """Why PyPI would refuse this platform tag, or None (PEP 600 manylinux_X_Y_ARCH, or the legacy aliases)."""
    tags = platform.split(".")
    ok = [t for t in tags if re.fullmatch(r"manylinux_\d+_\d+_(x86_64|aarch64|ppc64le|s390x|i686)", t)
          or re.fullmatch(r"manylinux(1|2010|2014)_(x86_64|aarch64|ppc64le|s390x|i686)", t)]
    if len(ok) != len(tags):
        return f"platform tag {platform!r} is not manylinux (PyPI refuses linux_* wheels; run auditwheel repair)"
    return None


def read_build_info(whl: zipfile.ZipFile) -> dict | None:
    import json

    try:
        return json.loads(whl.read("fastpeft/_build_info.json"))
    except KeyError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--expect", required=True, help="SASS architectures, e.g. 80,90 or '8.0;9.0'")
    ap.add_argument("--expect-ptx", default=None, help="PTX architectures embedded too (default: not checked)")
    ap.add_argument("--require-cuobjdump", action="store_true", help="fail when no cuobjdump is found")
    ap.add_argument("--manylinux", action="store_true", help="fail unless the platform tag is manylinux")
    ap.add_argument("--expect-cuda", default=None, help="CUDA version the build record must name, e.g. 13.0")
    args = ap.parse_args(argv)

    expect = parse_archs(args.expect)
    py_tag, abi_tag, platform = wheel_tags(args.wheel.name)
    with zipfile.ZipFile(args.wheel) as whl:
        info = read_build_info(whl)
        members = [n for n in whl.namelist() if re.fullmatch(r"fastpeft/_C[.\w-]*\.so", n)]
        if len(members) != 1:
            print(f"FAIL {args.wheel.name}: expected one fastpeft/_C*.so, found {members or 'none'}")
            return 1
        with tempfile.TemporaryDirectory() as tmp:
            so = Path(whl.extract(members[0], tmp))
            cuobjdump = find_cuobjdump()
            if cuobjdump is None and args.require_cuobjdump:
                print("check_wheel: cuobjdump not found (pip install nvidia-cuda-cuobjdump, or set CUDA_HOME)")
                return 2
            if cuobjdump is not None:
                sass, ptx = list_with_cuobjdump(cuobjdump, so)
                how = f"cuobjdump --list-elf ({cuobjdump})"
            else:
                sass, ptx = list_with_fatbin_reader(so)
                how = "the .nv_fatbin reader (no cuobjdump found)"
            needed = needed_libraries(so)

    problems = []
    if sorted(set(sass)) != expect:
        problems.append(f"SASS for {sorted(set(sass))}, expected exactly {expect}")
    if args.expect_ptx is not None and sorted(set(ptx)) != parse_archs(args.expect_ptx):
        problems.append(f"PTX for {sorted(set(ptx))}, expected {parse_archs(args.expect_ptx)}")
    if args.manylinux and manylinux_problem(platform):
        problems.append(manylinux_problem(platform))
    if info is None:
        problems.append("no fastpeft/_build_info.json (the record of the CUDA version and architectures)")
    else:
        if sorted(info.get("sass_archs") or []) != sorted(set(sass)):
            problems.append(f"_build_info.json names SASS {info.get('sass_archs')}, "
                            f"the binary holds {sorted(set(sass))}")
        if sorted(info.get("ptx_archs") or []) != sorted(set(ptx)):
            problems.append(f"_build_info.json names PTX {info.get('ptx_archs')}, the binary holds {sorted(set(ptx))}")
        if not info.get("cuda"):
            problems.append("_build_info.json names no CUDA version")
        elif args.expect_cuda and info["cuda"] != args.expect_cuda:
            problems.append(f"built with CUDA {info['cuda']}, expected {args.expect_cuda}")
    linked = [n for n in needed if re.match(r"lib(cudart|torch|c10)", n)]
    if linked:
        problems.append(f"links {linked} dynamically (the CUDA runtime must be static, libtorch absent)")
    listing = ", ".join(f"sm_{a}" for a in sass) + "".join(f", compute_{a} (PTX)" for a in ptx)
    print(f"{members[0]}: {listing}  [by {how}; needs {', '.join(needed)}]")
    print(f"tags {py_tag}-{abi_tag}-{platform}; build record: " +
          (f"CUDA {info.get('cuda')}, SASS {info.get('sass_archs')}, PTX {info.get('ptx_archs')} "
           f"(from {info.get('arch_list_from')})" if info else "missing"))
    if problems:
        print(f"FAIL {args.wheel.name}: " + "; ".join(problems))
        return 1
    print(f"OK {args.wheel.name}: SASS exactly {', '.join(f'sm_{a}' for a in expect)}"
          + (f", CUDA {info['cuda']}" if info else "") + (", manylinux" if args.manylinux else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
