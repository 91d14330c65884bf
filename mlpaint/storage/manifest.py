"""A folder written whole, verified when read: the one manifest every artefact folder carries.

A finished folder (a fit, a matrix, a shared table, a published bundle) holds
`manifest.json`, written last, listing every other file with its SHA-256 and size. Its
presence is what "finished" means, so a reader never takes a half-written folder for a
whole one; and a reader checks each file against it, so a damaged or half-copied file
raises `IntegrityError` naming it instead of training or being served.

Manifests written before the sizes were recorded list a bare SHA-256 per file; they are
read the same way.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from mlpaint.data.integrity import IntegrityError, atomic_folder, atomic_path, sha256_file

MANIFEST = "manifest.json"


def is_whole(folder: Path) -> bool:
    """Whether `folder` was finished: its manifest, written last, is there."""
    return (folder / MANIFEST).is_file()


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` but its manifest, as sorted relative POSIX paths."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path, **header: object) -> dict:
    """Hash every file of `folder` and write its manifest (atomically, last), with `header`
    fields beside the file list. Returns the manifest."""
    files = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
             for name in folder_files(folder)}
    manifest = {**header, "files": files}
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest's content, or `IntegrityError` naming `where` if it is not one."""
    try:
        manifest = json.loads(data)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
    except (ValueError, AttributeError) as exc:
        raise IntegrityError(f"{where}: unreadable {MANIFEST}: {exc}") from exc
    return manifest


def expected_hashes(manifest: dict) -> dict[str, str]:
    """File name → SHA-256, from either manifest form."""
    return {name: entry if isinstance(entry, str) else entry["sha256"]
            for name, entry in manifest["files"].items()}


def read_manifest(folder: Path, where: str | None = None) -> dict:
    """The manifest of `folder`; `IntegrityError` if it has none (it was never finished)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{where or folder}: no {MANIFEST} (not written whole)")
    return parse_manifest(path.read_bytes(), where or str(folder))


def check_files(folder: Path, manifest: dict, where: str | None = None) -> None:
    """Every file the manifest lists is in `folder` with the bytes it records; the first that
    is not raises `IntegrityError`, naming it as `<where>/<name>`."""
    where = where or str(folder)
    for name, expected in sorted(expected_hashes(manifest).items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{where}/{name}: missing (listed in its {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"{where}/{name}: sha256 {actual} does not match the "
                                 f"manifest ({expected})")


def verify_folder(folder: Path, where: str | None = None) -> dict:
    """Read `folder`'s manifest and check every file it lists; returns the manifest."""
    manifest = read_manifest(folder, where)
    check_files(folder, manifest, where)
    return manifest


# Folders this process has verified, with their files' sizes and modification times then: a
# file changed since (damaged, replaced) is hashed again.
_verified: set[tuple[str, bytes, tuple]] = set()
_verify_lock = threading.Lock()


def _file_stats(folder: Path, manifest: dict) -> tuple:
    """The size and modification time of each file the manifest lists."""
    stats = {name: (folder / name).stat() for name in manifest["files"]}
    return tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items())


def remember_verified(folder: Path) -> None:
    """Record `folder` as verified as it is now (this process has just hashed its files)."""
    manifest = (folder / MANIFEST).read_bytes()
    stats = _file_stats(folder, parse_manifest(manifest, str(folder)))
    with _verify_lock:
        _verified.add((str(folder), manifest, stats))


def verify_folder_once(folder: Path, where: str | None = None) -> Path:
    """`folder`, its files checked against its manifest once per process while they stay
    unchanged (a folder read by many tasks, or many threads, is hashed once)."""
    where = where or str(folder)
    if not (folder / MANIFEST).is_file():
        raise IntegrityError(f"{where}: no {MANIFEST} (not written whole)")
    manifest = (folder / MANIFEST).read_bytes()
    parsed = parse_manifest(manifest, where)
    try:
        stats = _file_stats(folder, parsed)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{exc.filename}: missing (listed in the {MANIFEST} of "
                             f"{where})") from exc
    with _verify_lock:  # threads reading one matrix hash it once, not once each
        if (str(folder), manifest, stats) not in _verified:
            check_files(folder, parsed, where)
            _verified.add((str(folder), manifest, stats))
    return folder


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    """Write each array as `<name>.npy` (and `meta` as meta.json) to `folder` atomically
    (`atomic_folder`), its manifest last: the folder is cached under a key of what it was
    built from, and verified when read."""
    with atomic_folder(folder, marker=MANIFEST) as staging:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        if meta is not None:
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        write_manifest(staging)
    return folder


def load_arrays(folder: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `save_arrays` wrote, the folder checked against its manifest first (once
    per process while its files stay unchanged)."""
    verify_folder_once(folder)
    return {name: np.load(folder / f"{name}.npy") for name in names}
