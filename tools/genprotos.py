"""Generate `switchboard/v1` (messages, gRPC stubs, type stubs) from `protos/`.

`--check` regenerates into a scratch folder and fails if the committed code differs,
so CI catches generated code that is stale or missing.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("switchboard") / "v1"
BIN = Path(sys.executable).parent  # the virtualenv's plugins
INIT_TEXT = '"""Generated from protos/ by `make protos`: do not edit."""\n'


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    # A subprocess, so the plugins' chatter ("Writing mypy to ...") shows only on failure.
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"protoc failed:\n{result.stdout}{result.stderr}")
    for package in (out / "switchboard", out / PACKAGE):
        (package / "__init__.py").write_text(INIT_TEXT)
        (package / "py.typed").write_text("")


def differences(left: Path, right: Path) -> list[str]:
    names = {p.name for p in left.iterdir()} | {p.name for p in right.iterdir()}
    names.discard("__pycache__")
    return sorted(
        name
        for name in names
        if not (left / name).exists()
        or not (right / name).exists()
        or not filecmp.cmp(left / name, right / name, shallow=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch)
        generate(fresh)
        committed = ROOT / "switchboard"
        if check:
            if not committed.exists():
                sys.exit("switchboard/ is missing: run `make protos`")
            stale = differences(fresh / "switchboard", committed) + [
                f"v1/{n}" for n in differences(fresh / PACKAGE, ROOT / PACKAGE)
            ]
            stale = [n for n in stale if n != "v1"]
            if stale:
                sys.exit(f"generated code is stale ({', '.join(stale)}): run `make protos`")
            return
        shutil.rmtree(committed, ignore_errors=True)
        shutil.copytree(fresh / "switchboard", committed)
        print(f"generated {committed.relative_to(ROOT)} from {PROTO_ROOT.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
