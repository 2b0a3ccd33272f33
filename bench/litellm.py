"""LiteLLM's proxy beside the gateway, for a side-by-side figure (``bench.overhead --litellm``).

Installs ``litellm[proxy]`` from PyPI into its own virtualenv (kept in
``$XDG_CACHE_HOME/llm-metering-gateway/litellm-venv``, reused by later runs; never into the
project's environment), and runs its proxy in front of the same emulator, with every model
routed to it as an OpenAI-compatible backend. No database: LiteLLM's proxy then does
authentication with its master key, routing and cost tracking in memory, its lightest setup.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["start_litellm", "version"]

MASTER_KEY = "sk-bench-master"


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "llm-metering-gateway" / "litellm-venv"


def _install() -> Path:
    venv = venv_dir()
    python = venv / "bin" / "python"
    if python.exists() and (venv / "bin" / "litellm").exists():
        return python
    print(f"  installing litellm[proxy] into {venv} (once; a few minutes) ...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", "litellm[proxy]"],
        check=True,
    )
    return python


def version() -> str:
    out = subprocess.run(
        [
            str(venv_dir() / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
    )
    return "litellm " + (out.stdout.strip() or "unknown")


def start_litellm(upstream: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """(process, base URL, master key) of a LiteLLM proxy forwarding every model to ``upstream``."""
    from tests.servers import free_port

    python = _install()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        '  - model_name: "*"\n'
        "    litellm_params:\n"
        '      model: "openai/*"\n'
        f'      api_base: "{upstream}"\n'
        '      api_key: "none"\n'
        "general_settings:\n"
        f'  master_key: "{MASTER_KEY}"\n'
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    port = free_port()
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"}
    log = open(workdir / "litellm.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [
            str(python),
            "-c",
            "from litellm.proxy.proxy_cli import run_server; run_server()",
            *("--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM exited with {proc.returncode}: see {workdir / 'litellm.log'}")
        try:
            if httpx.get(url + "/health/liveliness", timeout=1).status_code == 200:
                return proc, url, MASTER_KEY
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("LiteLLM did not start within 180 s")
