"""Atomic directory writes: build in ``<dir>.tmp-<pid>``, fsync, then rename into place.

A reader never sees a half-written directory under the final name: either the previous content
(or nothing) or the complete new one. A crash leaves a ``*.tmp-<pid>`` directory behind, which
no loader accepts (checkpoints also carry a marker file written last) and which can be deleted.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any

from megarlhf.weights.hf_io import fsync_path

MARKER = ".megarlhf-output"
MARKER_FORMAT = "megarlhf.output"


def write_marker(directory: str, writer: str, files: list[str] | None = None) -> None:
    """Marks ``directory`` as megarlhf's output (written by ``writer``, e.g. "train sft");
    ``files``: every file megarlhf wrote there (relative paths), for a directory replaced as a
    whole (:func:`publish`), so that a replacement can tell a file added later from its own."""
    path = os.path.join(directory, MARKER)
    info = {"format": MARKER_FORMAT, "writer": writer,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}
    if files is not None:
        info["files"] = sorted(files)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
        f.write("\n")
    os.replace(tmp, path)


def relative_files(directory: str) -> list[str]:
    """Every file (and symlink) under ``directory`` as a path relative to it, the marker
    excluded."""
    out = []
    for root, dirs, files in os.walk(directory):
        rel = os.path.relpath(root, directory)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.normpath(os.path.join(rel, name))
            if p != MARKER:
                out.append(p)
    return sorted(out)


def record_added_files(directory: str, added: list[str]) -> None:
    """Adds ``added`` (files megarlhf just wrote into its published ``directory``, e.g. the
    tokenizer next to an exported model) to the files its marker records."""
    info = read_marker(directory)
    if info is None or not isinstance(info.get("files"), list):
        raise ValueError(f"{directory} is not a published megarlhf output with a file record")
    write_marker(directory, str(info.get("writer", "megarlhf")),
                 files=sorted(set(info["files"]) | set(added)))


def read_marker(directory: str) -> dict[str, Any] | None:
    """The marker of ``directory``, or None where megarlhf did not mark it."""
    path = os.path.join(directory, MARKER)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == MARKER_FORMAT else None


def temp_dir_for(final_dir: str, pid: int | None = None) -> str:
    """The temporary sibling ``<final_dir>.tmp-<pid>`` a write builds in."""
    return f"{os.path.abspath(final_dir).rstrip(os.sep)}.tmp-{pid or os.getpid()}"


def fsync_tree(path: str) -> None:
    """fsyncs every file and directory under ``path`` (and ``path`` itself)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def publish(tmp_dir: str, final_dir: str, overwrite: bool = False,
            writer: str = "megarlhf") -> None:
    """Renames the complete ``tmp_dir`` to ``final_dir`` (fsynced first), marked as megarlhf's
    output (:mod:`megarlhf.checkpoint.outputs`: only marked directories are ever replaced).

    With ``overwrite``, an existing ``final_dir`` is first renamed aside and deleted after the
    new one is in place (a crash in between leaves it as ``<final_dir>.old-<pid>``). Callers
    check with :func:`megarlhf.checkpoint.outputs.check_target` that it is theirs to replace.

    Raises:
        FileExistsError: ``final_dir`` exists and ``overwrite`` is False.
    """
    final_dir = os.path.abspath(final_dir).rstrip(os.sep)
    write_marker(tmp_dir, writer, files=relative_files(tmp_dir))
    fsync_tree(tmp_dir)
    old = None
    if os.path.lexists(final_dir):
        if not overwrite:
            raise FileExistsError(f"{final_dir} exists; pass overwrite to replace it")
        old = f"{final_dir}.old-{os.getpid()}"
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_path(os.path.dirname(final_dir) or ".")
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def write_file_atomic(path: str, data: str | bytes) -> None:
    """Writes ``path`` whole or not at all: ``<path>.tmp-<pid>``, fsync, rename into place.

    A reader (or a resumed study) sees the previous content or the complete new one, never a
    half-written file, whatever kills the writer.
    """
    mode = "wb" if isinstance(data, bytes) else "w"
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, mode, **({} if isinstance(data, bytes) else {"encoding": "utf-8"})) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def write_json_atomic(path: str, obj: Any) -> None:
    """:func:`write_file_atomic` of ``obj`` as indented JSON."""
    write_file_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


# A job that finished and wrote its final outputs gets this file in its directory, written
# last and atomically (like a checkpoint's ``COMPLETE``): its presence is the only proof of
# completion a study runner (megarlhf.study) accepts.
COMPLETE = "COMPLETE.json"


def mark_complete(directory: str, info: dict[str, Any]) -> None:
    """Writes ``<directory>/COMPLETE.json`` (atomically, last)."""
    write_json_atomic(os.path.join(directory, COMPLETE),
                      {"format": MARKER_FORMAT + ".complete", **info})


def read_complete(directory: str) -> dict[str, Any] | None:
    """The completion record of ``directory``, or None where the job did not complete."""
    try:
        with open(os.path.join(directory, COMPLETE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and \
        info.get("format") == MARKER_FORMAT + ".complete" else None
