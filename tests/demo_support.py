"""Shared by the demo tests: import demo/app.py, save a tiny checkpoint, run the app as the README says."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "demo" / "app.py"


def load_app():
    """demo/app.py as a module, loaded from its file: it is run as a script (`python demo/app.py`)."""
    if "dynrefer_demo_app" in sys.modules:
        return sys.modules["dynrefer_demo_app"]
    spec = importlib.util.spec_from_file_location("dynrefer_demo_app", APP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def save_tiny_checkpoint(folder: Path) -> Path:
    """A DynReferConfig.tiny() model with seeded random weights (its captions are words, not empty)."""
    import torch

    from dynrefer_core.config import DynReferConfig
    from dynrefer_core.modeling.dynrefer import DynRefer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DynRefer(DynReferConfig.tiny())
    return model.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(*args: str, timeout: float = 120.0):
    """`python demo/app.py --host 127.0.0.1 --port P *args` in a subprocess; yields its URL, stops it after."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty app must never block on a full pipe
    proc = subprocess.Popen([sys.executable, str(APP), "--host", "127.0.0.1", "--port", str(port), *args],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the app exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
