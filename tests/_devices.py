"""Run a function of a test module in a fresh Python process that sees N CPU devices (XLA fixes the count at start-up)."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_on_devices(n: int, # CPU devices the process sees
                   module: str, # a test module's name, e.g. "test_model"
                   call: str, # a call on it, e.g. "sharded_outputs('/tmp/x.npz')"
                  ) -> None:
    "Import tests/module in a process with n CPU devices and run module.call; fail with its stderr if it fails."
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module} as t; t.{call}"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert r.returncode == 0, r.stderr[-3000:]
