"""write_atomic and read: long names, permission bits, symbolic links and I/O failures."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import timm
import torch

import petl_surgery as ps
from petl_surgery.checkpoints.files import read, write_atomic

METADATA = {"k": "v"}


def tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(2, 3, generator=generator), "b": torch.arange(4, dtype=torch.int64) + seed}


def assert_holds(path, expected):
    """``path`` is a safetensors file with exactly ``expected`` and METADATA."""
    loaded, metadata = read(path)
    assert metadata == METADATA
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def tiny_model():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3
    )
    ps.apply(model, "patt", mid_dim=4)
    return model


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


# ---------------------------------------------------------------- round trip and names


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "delta.safetensors"
    size = write_atomic(path, tensors(), METADATA)
    assert size == path.stat().st_size
    assert_holds(path, tensors())
    assert os.listdir(tmp_path) == ["delta.safetensors"]


def test_file_name_of_255_characters_is_written(tmp_path):
    name = "x" * (255 - len(".safetensors")) + ".safetensors"
    write_atomic(tmp_path / name, tensors(), METADATA)
    assert os.listdir(tmp_path) == [name]
    assert_holds(tmp_path / name, tensors())


def test_save_to_a_file_name_of_250_characters(tmp_path):
    name = "d" * (250 - len(".safetensors")) + ".safetensors"
    plain = tmp_path / "plain.safetensors"
    model = tiny_model()
    ps.save(model, plain)
    ps.save(model, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == sorted([name, "plain.safetensors"])
    assert (tmp_path / name).read_bytes() == plain.read_bytes()


def test_file_name_over_255_characters_is_a_surgery_error(tmp_path):
    path = tmp_path / ("x" * 256)
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(path, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {path}: File name too long"
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- permission bits


def test_overwritten_file_keeps_its_permission_bits(tmp_path, umask_027):
    path = tmp_path / "delta.safetensors"
    write_atomic(path, tensors(0), METADATA)
    os.chmod(path, 0o604)
    write_atomic(path, tensors(1), METADATA)
    assert mode_of(path) == 0o604
    assert_holds(path, tensors(1))


def test_new_file_mode_is_0666_less_the_umask(tmp_path, umask_027):
    path = tmp_path / "delta.safetensors"
    write_atomic(path, tensors(), METADATA)
    assert mode_of(path) == 0o640
    assert os.umask(0o027) == 0o027  # the umask is left as it was


# ---------------------------------------------------------------- symbolic links


def test_symlink_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "delta.safetensors"
    write_atomic(real, tensors(0), METADATA)
    os.chmod(real, 0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    write_atomic(link, tensors(1), METADATA)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_holds(real, tensors(1))
    assert mode_of(real) == 0o640
    assert os.listdir(tmp_path / "real") == ["delta.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "real"]


def test_chain_of_relative_symlinks_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "delta.safetensors"
    write_atomic(real, tensors(0), METADATA)
    (tmp_path / "middle.safetensors").symlink_to(Path("real") / "delta.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to("middle.safetensors")
    write_atomic(link, tensors(1), METADATA)
    assert os.readlink(link) == "middle.safetensors"
    assert os.readlink(tmp_path / "middle.safetensors") == os.path.join("real", "delta.safetensors")
    assert_holds(real, tensors(1))


def test_dangling_symlink_writes_the_file_it_names(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "new.safetensors"
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    write_atomic(link, tensors(), METADATA)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert_holds(real, tensors())
    assert os.listdir(tmp_path / "real") == ["new.safetensors"]


def test_dangling_symlink_into_a_missing_directory_is_refused(tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "missing" / "new.safetensors")
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(link, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {link}: directory {tmp_path / 'missing'} does not exist"
    assert link.is_symlink() and os.listdir(tmp_path) == ["link.safetensors"]


def test_symlink_loop_is_refused(tmp_path):
    link = tmp_path / "link.safetensors"
    link.symlink_to("other.safetensors")
    (tmp_path / "other.safetensors").symlink_to("link.safetensors")
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(link, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {link}: it is a loop of symbolic links"
    assert link.is_symlink() and os.readlink(link) == "other.safetensors"


def test_save_writes_through_a_symlink(tmp_path):
    model = tiny_model()
    plain = tmp_path / "plain.safetensors"
    ps.save(model, plain)
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "delta.safetensors"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    ps.save(model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == plain.read_bytes()
    assert mode_of(real) == 0o640


# ---------------------------------------------------------------- existing refusals


def test_missing_directory_is_refused(tmp_path):
    path = tmp_path / "missing" / "delta.safetensors"
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(path, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {path}: directory {path.parent} does not exist"


def test_directory_that_is_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    path = tmp_path / "file" / "delta.safetensors"
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(path, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {path}: directory {path.parent} does not exist"
    assert (tmp_path / "file").read_bytes() == b"not a directory"


def test_directory_at_the_path_is_refused(tmp_path):
    path = tmp_path / "delta.safetensors"
    path.mkdir()
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(path, tensors(), METADATA)
    assert str(caught.value) == f"cannot save to {path}: it is a directory"
    assert path.is_dir() and os.listdir(tmp_path) == ["delta.safetensors"]


# ---------------------------------------------------------------- I/O failures


@pytest.mark.parametrize(
    "function, code, reason",
    [("replace", errno.EIO, "Input/output error"), ("fsync", errno.ENOSPC, "No space left on device")],
)
def test_io_failure_is_a_surgery_error_and_leaves_the_old_file(tmp_path, monkeypatch, function, code, reason):
    path = tmp_path / "delta.safetensors"
    write_atomic(path, tensors(0), METADATA)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(code, reason)

    monkeypatch.setattr(os, function, fail)
    with pytest.raises(ps.SurgeryError) as caught:
        write_atomic(path, tensors(1), METADATA)
    monkeypatch.undo()
    assert str(caught.value) == f"cannot save to {path}: {reason}"
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(tmp_path) == ["delta.safetensors"]
    assert path.read_bytes() == before


def test_read_error_is_a_surgery_error(tmp_path, monkeypatch):
    path = tmp_path / "delta.safetensors"
    write_atomic(path, tensors(), METADATA)

    def fail(self):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", fail)
    with pytest.raises(ps.SurgeryError) as caught:
        read(path)
    assert str(caught.value) == f"cannot read {path}: Permission denied"
