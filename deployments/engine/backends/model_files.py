"""Where a model's files are, and a digest of them: what identifies a model's weights across starts.

Used for the key of the OpenVINO compile cache's entry (``openvino_runtime.entry_key``) and for the
fingerprint of the vectors a replica keeps on disk (``deployments/engine/vector_store.py``). A start must
not read gigabytes to find either, so weights are identified without reading them: a file in the Hugging
Face cache is a link to a blob named by its content's SHA-256, which is taken as is; any other large file
by its size and modification time. Files up to ``HASHED_FILE_BYTES`` (configs, tokenizers) are read.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

# Files up to this size (configs, tokenizers) are keyed by content; larger ones (weights) by the blob
# they link to in the Hugging Face cache, else by size and modification time.
HASHED_FILE_BYTES = 4 << 20


def local_model_dir(source: str) -> Path | None:
    """The directory holding a model's files: ``source`` itself, or a hub id's snapshot in the local
    Hugging Face cache (None when it has not been downloaded)."""
    path = Path(source)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not downloaded, not a hub id: nothing to identify it by
        return None


def update_with_model_files(digest: Any, model_dir: Path) -> None:
    """Feed every file of ``model_dir`` (hidden ones aside) into ``digest``: its name and size, then its
    content when small, else the content hash its Hugging Face blob is named by, else its mtime."""
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(model_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        stat = path.stat()
        digest.update(f"\n{relative} {stat.st_size}".encode())
        if stat.st_size <= HASHED_FILE_BYTES:
            digest.update(path.read_bytes())
        elif path.is_symlink() and path.resolve().parent.name == "blobs":
            digest.update(f" blob {path.resolve().name}".encode())
        else:
            digest.update(f" {stat.st_mtime_ns}".encode())


def package_versions(packages: tuple[str, ...]) -> str:
    """``"name version; ..."`` for each package ("-" where not installed): what shaped a result."""
    parts = []
    for package in packages:
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} -")
    return "; ".join(parts)
