"""Builds the CUDA kernels (csrc/kernels) for the CPU emulator (emu.h) and loads them.

The kernel sources are copied with the rewrites that C++ needs: each launch
``k<<<grid, block, smem, stream>>>(args)`` (and cudaLaunchCooperativeKernel) becomes a call
of ``emu::launch`` with a lambda that runs ``k(args)`` as one thread, each __shared__
declaration becomes a reference to the running block's shared memory, and each
__launch_bounds__ becomes a check of the block size on entry. Everything else is
compiled as written, with the device branches of csrc/common (``__CUDA_ARCH__`` = 900).
Needs g++ and the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h); no GPU,
no CUDA library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's include directory (CUDA_HOME, CUDA_PATH, or next to nvcc)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c) / "include"
    return None


def _matching(text: str, i: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_ch:
            depth += 1
        elif text[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} at offset {i}")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (``name`` or ``ns::name<args>``) that ends at ``end``."""
    i = end
    while text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # template arguments, possibly with nested <> and ()
        depth = 0
        while True:
            i -= 1
            ch = text[i]
            if ch in ">)":
                depth += 1
            elif ch in "<(":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _split_top(args: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def rewrite_launches(text: str) -> str:
    while True:
        i = text.find("<<<")
        if i < 0:
            break
        start = _kernel_start(text, i)
        kernel = text[start:i].strip()
        j = text.index(">>>", i)
        config = _split_top(text[i + 3 : j])
        config += ["0", "0"][: 4 - len(config)]
        k = j + 3
        while text[k].isspace():
            k += 1
        if text[k] != "(":
            raise ValueError(f"launch of {kernel} without arguments")
        end = _matching(text, k, "(", ")")
        args = text[k + 1 : end - 1]
        name = re.sub(r"\s+", " ", kernel).replace('"', "'")
        # The kernel's address keys its dynamic shared memory limit (cudaFuncSetAttribute).
        # Only launches with dynamic shared memory take it: elsewhere the kernel's template
        # arguments may be deduced from the call's, and &kernel would not resolve.
        address = "nullptr" if config[2] == "0" else f"::emu::kernel_address(&{kernel})"
        call = (
            f"::emu::launch({address}, \"{name}\", dim3({config[0]}), "
            f"dim3({config[1]}), static_cast<size_t>({config[2]}), false, [=] {{ {kernel}({args}); }})"
        )
        text = text[:start] + call + text[end:]
    return re.sub(
        r"cudaLaunchCooperativeKernel\(\s*reinterpret_cast<const void\s*\*>\(([^()]*?)\)\s*,",
        lambda m: f'::emu::launch_cooperative({m.group(1)}, "{m.group(1)}",',
        text,
    )


# A kernel's block-size bound: __launch_bounds__(threads, ...) or FASTLOSS_MAX_REGS(regs, threads)
# (device_utils.cuh), each except in a macro's definition.
_LAUNCH_BOUNDS = re.compile(r"^(?!\s*#\s*define)(.*?)\b(__launch_bounds__|FASTLOSS_MAX_REGS)\(", re.M)


def rewrite_launch_bounds(text: str) -> str:
    """Each kernel's __launch_bounds__ (or FASTLOSS_MAX_REGS) becomes a check, on entry, that the
    block is no larger: a GPU refuses such a launch."""
    out, pos = [], 0
    code = _without_comments(text)
    for m in _LAUNCH_BOUNDS.finditer(code):
        open_paren = m.end() - 1
        close = _matching(code, open_paren, "(", ")")
        args = _split_top(code[open_paren + 1 : close - 1])
        max_threads = args[1] if m.group(2) == "FASTLOSS_MAX_REGS" else args[0]
        start = m.start(2)
        body = code.index("{", close)  # the kernel's parameters hold no brace
        out.append(text[pos:start] + text[close : body + 1])
        out.append(f" ::emu::check_max_threads({max_threads});")
        pos = body + 1
    out.append(text[pos:])
    return "".join(out)


def _without_comments(text: str) -> str:
    """``text`` with comments blanked out (same length, so offsets still match)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, text, flags=re.S)


def rewrite(name: str, text: str) -> str:
    """A kernel source as the emulator compiles it; fails on CUDA syntax a rewrite left behind
    (a form it does not know)."""
    text = rewrite_shared(rewrite_launches(rewrite_launch_bounds(text)))
    code = re.sub(r"^\s*#\s*define[^\n]*", "", _without_comments(text), flags=re.M)
    for token in ("<<<", "__shared__", "__launch_bounds__", "cudaLaunchCooperativeKernel"):
        if token in code:
            line = code[: code.index(token)].count("\n") + 1
            raise RuntimeError(f"emulator build: {name}:{line}: '{token}' in a form build.py does not rewrite")
    return text


_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<> ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\];]*\])*)\s*;")


def rewrite_shared(text: str) -> str:
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::emu::dynamic_smem());", text
    )
    return _SHARED.sub(
        lambda m: (
            f"static char {m.group(2)}_emu_key; "
            f"auto& {m.group(2)} = ::emu::shared_var<{m.group(1)}{m.group(3)}>(&{m.group(2)}_emu_key);"
        ),
        text,
    )


def _sources() -> List[Path]:
    files = sorted((CSRC / "kernels").glob("*")) + sorted((CSRC / "common").glob("*.h"))
    return files + [Path(__file__)] + sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.cpp")) + sorted(HERE.glob("*.cu")) + sorted((HERE / "include").glob("*"))


def build(out_dir: Path, arch: int = 900, jobs: Optional[int] = None, contract: bool = False) -> Path:
    """Compiles the emulated kernels and the test shim into ``out_dir``; returns the library.
    Reuses an earlier build of the same sources. contract: fuse multiplies and adds into FMAs
    where the compiler sees fit (-O2 -mfma -ffp-contract=fast), as nvcc does by default; the
    CPU build never does, so the two then round differently."""
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("CUDA headers not found (set CUDA_HOME)")
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(f"{arch} {contract} {include} {compiler}".encode())
    for f in _sources():
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    tag = digest.hexdigest()[:16]
    # One build per variant is kept; a variant's older builds are removed.
    variant = f"{'fma' if contract else 'plain'}{arch // 10}"
    lib = out_dir / f"libfastloss_emu_{variant}_{tag}.so"
    if lib.exists():
        return lib
    for old in list(out_dir.glob(f"libfastloss_emu_{variant}_*.so")) + list(out_dir.glob(f"src_{variant}_*")):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    tree = out_dir / f"src_{variant}_{tag}"
    for sub in ("kernels", "common"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        for f in (CSRC / sub).glob("*"):
            text = f.read_text()
            if sub == "kernels":
                text = rewrite(f.name, text)
            (tree / sub / f.name).write_text(text)
    flags = [
        # Misaligned accesses (a vector load from an address not aligned for it) abort with
        # UBSan's report, as a GPU stops with a misaligned-address error.
        "g++", "-std=c++17", "-fPIC", "-w",
        *(["-O2", "-mfma", "-ffp-contract=fast"] if contract else ["-O1", "-ffp-contract=off"]),
        "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
        f"-DFASTLOSS_EMU_ARCH={arch}", "-include", str(HERE / "emu.h"),
        "-I", str(HERE / "include"), "-I", str(tree), "-I", str(HERE), "-I", str(include),
    ]
    units = [(tree / "kernels" / f.name, True) for f in sorted((CSRC / "kernels").glob("*.cu"))]
    selftest = tree / "selftest.cu"
    selftest.write_text(rewrite("selftest.cu", (HERE / "selftest.cu").read_text()))
    units.append((selftest, True))
    units += [(HERE / "emu_runtime.cpp", False), (HERE / "shim.cpp", False)]

    def compile_one(unit):
        src, is_cuda = unit
        obj = tree / (src.name + ".o")
        cmd = flags + (["-x", "c++"] if is_cuda else []) + ["-c", str(src), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build of {src.name} failed:\n{proc.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        futures = [pool.submit(compile_one, u) for u in units]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise RuntimeError("\n".join(str(e) for e in errors))
        objects = [f.result() for f in futures]
    tmp = lib.with_suffix(".tmp")
    # -Bsymbolic: the emulator's own cudaGetDevice etc. bind inside the library, not to the real
    # runtime that a CUDA build of torch loads globally (without a driver, that answers error 35).
    proc = subprocess.run(["g++", "-shared", "-Wl,-Bsymbolic", "-fsanitize=alignment", "-o", str(tmp)] +
                          [str(o) for o in objects],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulator link failed:\n{proc.stderr[-6000:]}")
    tmp.rename(lib)
    return lib


def load(out_dir: Path, arch: int = 900, contract: bool = False) -> ctypes.CDLL:
    return ctypes.CDLL(str(build(out_dir, arch, contract=contract)))


if __name__ == "__main__":
    import sys
    import tempfile

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
