"""Regenerate (or check) Leyline's committed Python code from contracts/leyline/leyline.proto.

protoc names its output after the proto's path (`leyline/leyline_pb2.py`); we generate into a
temporary tree and copy the two files into `esper/leyline/_generated`, so `--check` can diff the
exact bytes that would be written.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "leyline/leyline.proto"
FILES = ("leyline_pb2.py", "leyline_pb2.pyi")


def generate(into: Path) -> None:
    env = dict(os.environ)
    # protoc finds the mypy plugin (protoc-gen-mypy) on PATH: put this interpreter's bin first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "contracts"),
           f"--python_out={into}", f"--mypy_out={into}", PROTO]
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path, nargs="?")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        produced = Path(tmp) / "leyline"
        if args.check is not None:
            drift = [f for f in FILES if not (args.check / f).exists()
                     or not filecmp.cmp(produced / f, args.check / f, shallow=False)]
            if drift:
                print(f"proto-check: generated code is out of date: {', '.join(drift)}; run `make proto`")
                return 1
            print("proto-check: generated code matches contracts/leyline/leyline.proto")
            return 0
        out = args.out or args.target
        if out is None:
            parser.error("--out or --check is required")
        out.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(produced / f, out / f)
        (out / "__init__.py").touch()
        print(f"proto: wrote {', '.join(FILES)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
