"""The supervisor's capture keeper: the spool layout it reads is the writer's, and when it starts a converter."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mlflow_deploy_plugin.capture import spool
from mlflow_deploy_plugin.engines.local import capture_keeper


def test_the_keeper_spells_the_spool_layout_as_the_writer_does() -> None:
    assert capture_keeper.LOCK_NAME == spool.LOCK_NAME
    assert capture_keeper.SEGMENT_SUFFIX == spool.SEGMENT_SUFFIX
    assert capture_keeper.OPEN_SUFFIX == spool.OPEN_SUFFIX


def _writer_folder(root: Path, name: str, *files: str) -> int:
    """A writer's folder with ``files``; returns the fd holding its lock (as a live writer does)."""
    folder = root / name
    folder.mkdir(parents=True)
    for file in files:
        (folder / file).write_bytes(b"x")
    fd = os.open(folder / spool.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_work_is_a_complete_segment_or_the_folder_of_a_writer_that_is_gone(tmp_path: Path) -> None:
    root = tmp_path / ".spool"
    assert not capture_keeper.spool_has_work(root), "no spool yet"
    live = _writer_folder(root, "1-a", "seg-1.open", spool.CONFIG_NAME)
    making = _writer_folder(root, ".2-b")  # being made (dot-name): never looked at
    try:
        assert not capture_keeper.spool_has_work(root), "a live writer still appending: nothing to do"
        (root / "1-a" / "seg-0.seg").write_bytes(b"x")
        assert capture_keeper.spool_has_work(root)
        (root / "1-a" / "seg-0.seg").unlink()
        gone = _writer_folder(root, "3-c", "seg-3.open")
        os.close(gone)  # its writer died: its lock is free
        assert capture_keeper.spool_has_work(root)
    finally:
        os.close(live)
        os.close(making)


def test_a_writer_appending_to_a_segment_wants_the_converter_before_it_completes(tmp_path: Path) -> None:
    """The converter starts with a segment's first records (its imports are done by the time the
    segment completes), so one that exits after a few idle seconds delays no captured row."""
    root = tmp_path / ".spool"
    idle = _writer_folder(root, "1-a", spool.CONFIG_NAME)
    try:
        assert not capture_keeper.spool_wants_converter(root), "an idle writer: no converter"
        assert not capture_keeper.spool_has_work(root)
        (root / "1-a" / "seg-1.open").write_bytes(b"x")
        assert capture_keeper.spool_wants_converter(root), "records are being spooled: start it now"
        assert not capture_keeper.spool_has_work(root), "nothing to convert yet"
        (root / "1-a" / "seg-1.open").rename(root / "1-a" / "seg-1.seg")
        assert capture_keeper.spool_wants_converter(root) and capture_keeper.spool_has_work(root)
    finally:
        os.close(idle)
