"""What every benchmark shares: the run's identity (git sha, device, settings digest), medians, JSON output."""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"cpu: {model or platform.processor()} x{len(os.sched_getaffinity(0))}"


def settings_digest(settings: Any) -> str:
    text = settings.model_dump_json() if hasattr(settings, "model_dump_json") else json.dumps(settings, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def run_header(settings: Any) -> dict[str, str]:
    return {"git_sha": git_sha(), "device": device_name(), "settings_digest": settings_digest(settings)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def emit(result: dict[str, Any], json_path: str | None) -> None:
    """Print the one JSON line of the run and save it where asked."""
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
