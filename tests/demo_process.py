"""``python -m vocabseg demo`` in a subprocess, for the tests that start the real command (browser, signals)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def demo_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a demo subprocess: this checkout's package, offline, a fresh cache."""
    import vocabseg

    src = str(Path(vocabseg.__file__).resolve().parents[1])  # this checkout, also when installed elsewhere
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                HF_HUB_OFFLINE="1", VOCABSEG_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")


class DemoProcess:
    """``python -m vocabseg demo`` in a subprocess; its output is collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen([sys.executable, "-m", "vocabseg", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_url(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith("vocabseg demo: http://"):
                return line.split()[2]
        raise AssertionError(f"the demo did not start:\n{self.output}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Send ``sig`` (SIGINT: what Ctrl-C sends) and wait; kill after ``timeout`` s. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
