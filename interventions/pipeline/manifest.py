"""Provenance for results: software versions, git commit, command line, timings.

Every results directory carries ``manifest.json`` so a number can always be traced back to the
model (and its revision or weight hash), data set, code and environment that produced it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("nnsight", "transformers", "torch", "datasets", "numpy", "safetensors",
            "accelerate", "gguf", "matplotlib")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """Python, platform and the versions of the packages that shape the numbers."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "packages": versions}
    try:
        import torch

        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i)
                                    for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """The project's git commit and whether the working tree had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def base_manifest(argv: list[str] | None = None) -> dict:
    """The fields every manifest starts with."""
    return {
        "tool": "af1-toolkit",
        "command": " ".join(argv if argv is not None else sys.argv),
        "argv": list(argv if argv is not None else sys.argv),
        "started": now(),
        "git": git_state(),
        "environment": environment(),
    }
