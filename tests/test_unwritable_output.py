"""Output folders that cannot be written end in one message before the work starts; a checkpoint
that cannot be written replaces nothing.

Simulated: a folder under a regular file, a read-only folder (``chmod``; as root a read-only
tmpfs, skipped where mounting is not allowed), a full disk (a tiny tmpfs, same condition) and a
file-size limit (``RLIMIT_FSIZE``, i.e. ``ulimit -f``: works everywhere).
"""
import contextlib
import os
import resource
import subprocess

import pytest
import torch
from torch import nn

from conftest import run_train

from nformer_plugin.core.writable import OutputNotWritable, check_writable


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """``ulimit -f`` for this process, restored afterwards (writes past it fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def limit_file_size(nbytes: int):
    """``preexec_fn`` for a subprocess under ``ulimit -f``."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at ``path`` (root only; skips the test where mounting is not allowed)."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    else:  # root writes through permissions: a read-only file system
        with tmpfs(tmp_path / "ro", "ro,size=1m") as path:
            yield path


def test_a_folder_under_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritable, match=r"OUTPUT_DIR '.*file/out' cannot be created"):
        check_writable(str(tmp_path / "file" / "out"), what="OUTPUT_DIR")


def test_a_read_only_folder_is_named(read_only_dir):
    with pytest.raises(OutputNotWritable, match=r"/out' cannot be created \((Permission denied|"
                                                r"Read-only file system)\)"):
        check_writable(str(read_only_dir / "out"))
    with pytest.raises(OutputNotWritable, match="is not writable"):
        check_writable(str(read_only_dir))


def test_a_full_disk_is_found_before_the_first_checkpoint(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=256k") as path:
        check_writable(str(path), 64 * 1024)  # fits
        with pytest.raises(OutputNotWritable, match=r"cannot take a file of 1\.0 MiB"):
            check_writable(str(path), 2 ** 20)
        assert os.listdir(path) == []  # the probe is gone


def test_a_file_size_limit_is_found_before_the_first_checkpoint(tmp_path):
    check_writable(str(tmp_path), 2 ** 20)
    with file_size_limit(64 * 1024):
        with pytest.raises(OutputNotWritable, match=r"File too large.*ulimit -f"):
            check_writable(str(tmp_path), 2 ** 20)
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_that_cannot_be_written_replaces_nothing(tmp_path):
    from nformer_plugin.fastreid_ext.trainer import AtomicCheckpointer

    model = nn.Linear(256, 256)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000", epoch=0)
    good = (tmp_path / "model_0000.pth").read_bytes()
    with torch.no_grad():
        model.weight.add_(1)
    with file_size_limit(64 * 1024):
        for name in ("model_0001", "model_0000"):  # a new file, and over the good one
            with pytest.raises(OutputNotWritable, match=r"cannot write .*model_000[01]\.pth \("
                               r"File too large\); nothing was replaced: the last good "
                               r"checkpoint \(model_0000\.pth\) is intact.*--resume"):
                checkpointer.save(name, epoch=1)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"
    assert (tmp_path / "model_0000.pth").read_bytes() == good


def test_nformer_train_checkpoint_that_cannot_be_written_replaces_nothing(tmp_path):
    from nformer_plugin.core.nformer import NFormer, NFormerStage
    from nformer_plugin.core.nformer.training import Stage2Settings, build_stage2
    from nformer_plugin.core.nformer.training.checkpoints import CHECKPOINT_FILE, Stage2Checkpoints

    stage = NFormerStage(NFormer(dim=64, num_layers=1, ffn_dim=128, topk=5), 4)
    trainer = build_stage2(stage, torch.randn(32, 64), torch.arange(32) % 4,
                           Stage2Settings(epochs=2, set_size=16), seed=0)
    checkpoints = Stage2Checkpoints(str(tmp_path), 1, {"features_sha256": "x"})
    checkpoints.save(0, stage, trainer)
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    with file_size_limit(16 * 1024):
        with pytest.raises(OutputNotWritable, match=r"File too large.*the previous "
                                                    r"last_checkpoint\.pth\) is intact"):
            checkpoints.save(1, stage, trainer)
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == good


def test_nformer_commands_name_an_unwritable_output(tmp_path, capsys):
    from conftest import write_feature_files
    from nformer_plugin.cli import main

    paths, _ = write_feature_files(tmp_path, 20, 6, 14)
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "out")
    assert main(["train", "--train", paths["train"], "--output", bad]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["index", "build", "--weights", "w.pth", "--gallery", paths["g"],
                 "--output", bad]) == 2
    assert "--output" in capsys.readouterr().err


def _one_message(proc, prefix="fastreid-train: error: "):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Starting training" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_fastreid_train_unwritable_output_dir_ends_in_one_message(tiny_config, isolated_env,
                                                                  tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_train(["--config-file", tiny_config, "OUTPUT_DIR", str(tmp_path / "file" / "out")],
                     isolated_env)
    assert "OUTPUT_DIR" in _one_message(proc) and "cannot be created" in proc.stderr


def test_fastreid_train_without_room_for_a_checkpoint_stops_before_training(
        tiny_config, isolated_env, tmp_path):
    """Under ``ulimit -f 20 MB`` (the tiny ResNet-18's checkpoint is ~130 MB): one message once
    the model is built, before the first training step."""
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "fastreid-train")
    cmd = ([script] if os.path.exists(script)
           else [sys.executable, "-m", "nformer_plugin.fastreid_ext.train_net"])
    proc = subprocess.run(cmd + ["--config-file", tiny_config, "OUTPUT_DIR", str(tmp_path / "out")],
                          env=isolated_env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit_file_size(20 * 2 ** 20))
    message = _one_message(proc)
    assert "cannot take a file of" in message and "File too large" in message, message
    assert not list((tmp_path / "out").glob("*.pth"))
