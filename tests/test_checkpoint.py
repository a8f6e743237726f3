"""src.train.checkpoint: atomic writes, safe loads, RNG states that restore exactly."""

from __future__ import annotations

import random
import resource

import numpy as np
import pytest
import torch

import src.train.checkpoint as ck


def test_round_trip_with_rng_state(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.save_atomic({"model": {"w": torch.ones(2)}, "rng": state}, tmp_path / "last.pt")
    loaded = ck.load_checkpoint(tmp_path)  # a folder means its last.pt
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ck.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    ck.save_atomic({"model": {"v": torch.tensor(1)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        ck.save_atomic({"model": Unpicklable()}, path)
    assert ck.load_checkpoint(path)["model"]["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match="No checkpoint at"):
        ck.load_checkpoint(tmp_path / "nothing")
    good = tmp_path / "good.pt"
    ck.save_atomic({"model": {"w": torch.zeros(1000)}}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ck.CheckpointError, match="bad.pt is not a readable checkpoint"):
        ck.load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ck.CheckpointError, match="not a checkpoint written by this repository"):
        ck.load_checkpoint(other)


def test_temporary_files_of_a_killed_write_are_swept(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"  # what a SIGKILL during a write leaves
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".best.pt.xyz.tmp"  # another file's: not this write's business
    other.write_bytes(b"x")
    ck.save_atomic({"model": {}}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.xyz.tmp", "last.pt"]


def test_a_disk_that_fills_up_keeps_the_old_file_and_says_so_in_one_line(tmp_path):
    """No space left while writing: torch.save's RuntimeError becomes one line naming the file,
    in the caller's thread too (`BackgroundWriter`); the old file and no temporary one stay."""
    path = tmp_path / "last.pt"
    ck.save_atomic({"model": {"w": torch.zeros(10)}}, path)
    before = path.read_bytes()
    big = {"model": {"w": torch.zeros(100_000)}}  # 400 kB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # No write past 100 kB of a file: EFBIG (Python ignores SIGXFSZ), what ENOSPC is on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(ck.CheckpointError) as direct:
            ck.save_atomic(big, path)
        writer = ck.BackgroundWriter()
        writer.submit([(big, path)])
        with pytest.raises(ck.CheckpointError) as background:
            writer.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    expected = (
        f"The checkpoint {path} could not be written (File too large); its folder needs room "
        "on its disk and must be writable."
    )
    assert str(direct.value) == str(background.value) == expected
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
