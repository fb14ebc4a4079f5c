"""``python -m deployments.tools.compile_cache MODELS_YAML [--parent PID]``: convert every ``runtime:
openvino`` model of a models config into its compile cache, so its replicas start from the cached graph, no
torch.

The cache is per machine (``models[].compile_cache_dir``), so run this where the CPU replicas run: when a
node's image is built, or, as ``make serve`` does on a fresh machine (``deployments/tools/serve_local.py``),
beside Ray's own start-up, which then overlaps the conversion instead of waiting for it. A model already
cached costs a key check; a replica that starts before its entry is written converts it itself.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from deployments.config import load_models_config, resolve_config_path, resolve_model_source
from deployments.engine.backends.openvino_backend import fill_cache
from deployments.engine.backends.registry import compile_cache_dir


def compile_all(models_config: str | Path, threads: int = 1) -> list[str]:
    """One line per ``runtime: openvino`` model with a cache directory: what was done for it."""
    path = resolve_config_path(str(models_config))
    config = load_models_config(path)
    lines = []
    for entry in config.models:
        cache_dir = compile_cache_dir(entry, path.parent)
        if entry.runtime != "openvino" or cache_dir is None:
            continue
        try:
            how = fill_cache(
                resolve_model_source(entry.source, path.parent),
                max_seq_length=entry.max_seq_length,
                cache_dir=cache_dir,
                threads=threads,
                trust_remote_code=entry.trust_remote_code,
            )
        except Exception as exc:  # noqa: BLE001 - the replica loads it again and reports its own failure
            how = f"not converted ({type(exc).__name__}: {exc})"
        lines.append(f"compile cache: {entry.name}: {how}")
    return lines


def exit_with(parent: int, every_s: float = 1.0) -> None:
    """Exit this process once ``parent`` has gone (a stopped ``make serve`` leaves no converter behind)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    """``MODELS_YAML [--parent PID]``."""
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--parent"):
        print(__doc__, file=sys.stderr)
        return 2
    if len(argv) == 3:
        exit_with(int(argv[2]))
    for line in compile_all(argv[0]):
        print(line, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
