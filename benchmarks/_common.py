"""What the benchmark scripts share: atomic writes, the README blocks between markers, the CPU record.

Each script puts this folder on ``sys.path`` before importing it, so that it also loads when a test
imports the script from its file.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tarfile
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: SIMD flags of /proc/cpuinfo worth recording (what Numba's and OpenBLAS's kernels can use)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_tile", "neon", "asimd", "sve")


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` atomically (a reader sees the old file or the new one, never a part)."""
    from dfmpc.interop._atomic import write_atomically      # here: probes.py runs older dfmpc packages too
    write_atomically(path, lambda f: f.write(text.encode()), overwrite=True)


def replace_block(text: str, start: str, end: str, body: str) -> str:
    """``text`` with what lies between the markers ``start`` and ``end`` replaced by ``body`` (one line
    break on each side); SystemExit naming the markers when either is missing."""
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    return before + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def update_readme(body: str, start: str, end: str, readme: Path = README) -> None:
    """Replace the README's block between ``start`` and ``end`` by ``body`` (:func:`replace_block`)."""
    write_text(readme, replace_block(readme.read_text(), start, end, body))


def cpu_info() -> dict:
    """CPU model name, logical CPU count and the SIMD flags present (Linux /proc/cpuinfo; else platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "simd_flags": [f for f in SIMD_FLAGS if f in flags]}


def package_at(rev: str, into: str) -> str:
    """``reference/dfmpc`` of git revision ``rev`` extracted (``git archive``) under ``into``; returns the
    directory to put first on ``PYTHONPATH`` to import that package. ValueError naming ``--before``
    (the option every caller takes the revision from) when git cannot archive it."""
    r = subprocess.run(["git", "archive", rev, "reference/dfmpc"], cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        raise ValueError(f"--before: git cannot archive reference/dfmpc at {rev!r}: "
                         f"{r.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryFile() as f:
        f.write(r.stdout)
        f.seek(0)
        with tarfile.open(fileobj=f) as t:
            t.extractall(into, filter="data")
    return os.path.join(into, "reference")
