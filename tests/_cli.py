"""The CLI as a user runs it: a fresh interpreter, output captured (shared by the CLI tests)."""

import subprocess
import sys


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "collapselab.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
