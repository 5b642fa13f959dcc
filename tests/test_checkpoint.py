"""Checkpoints: atomic writes, weights_only loads, clear errors, fallback to the last good one."""

from __future__ import annotations

import pytest
import torch

from gradsurgery.training import checkpoint as ck


def test_round_trip_and_weights_only(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"loss": 0.5}]}
    path = ck.save_checkpoint(state, tmp_path / "epoch-3.pt")
    back = ck.load_checkpoint(path)
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "epoch-1.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(ck.CheckpointError, match=r"epoch-1\.pt"):
        ck.load_checkpoint(path)


def test_a_crash_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "epoch-1.pt"
    ck.save_checkpoint({"v": 1}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint({"v": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-1.pt"]  # no temporary left


def test_truncated_file_error_names_it_and_latest_falls_back(tmp_path):
    for e in (1, 2, 3):
        ck.save_checkpoint({"epoch": e}, tmp_path / f"epoch-{e}.pt")
    (tmp_path / "epoch-3.pt").write_bytes(b"\x80\x02garbage")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(ck.CheckpointError, match=r"epoch-3\.pt"):
        ck.load_checkpoint(tmp_path / "epoch-3.pt")
    with pytest.warns(RuntimeWarning, match=r"epoch-3\.pt"):
        state, path = ck.load_latest(tmp_path)
    assert state["epoch"] == 2 and path.name == "epoch-2.pt"
    assert [p.name for p in ck.checkpoint_paths(tmp_path)] == [
        "epoch-3.pt",
        "epoch-2.pt",
        "epoch-1.pt",
    ]
    assert ck.load_latest(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "epoch-9.pt")


def test_non_dict_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "epoch-1.pt"
    torch.save([1, 2], path)
    with pytest.raises(ck.CheckpointError, match="checkpoint dict"):
        ck.load_checkpoint(path)
