"""Run directories: claimed atomically, new or empty only; files replaced durably."""

import os
import threading
from pathlib import Path

import pytest
import torch

from fl_lightning.cli import main
from fl_lightning.errors import ConfigError
from fl_lightning.files import write_atomically
from fl_lightning.server.rundir import LOCK, RunDir, claim


def _race(target: Path, runs: int = 8) -> list[str]:
    """`runs` threads claim `target` at the same instant; each one's outcome."""
    barrier = threading.Barrier(runs)
    outcomes: list[str] = []

    def race() -> None:
        barrier.wait()
        try:
            claim(target, token=str(threading.get_ident()))
            outcomes.append("won")
        except ConfigError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=race) for _ in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_of_runs_racing_for_one_directory_exactly_one_wins(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "new" / "run", tmp_path / "empty"):
        outcomes = _race(target)
        assert outcomes.count("won") == 1, outcomes
        assert all(o == "won" or o.startswith(f"output.dir: {target}") for o in outcomes)
        assert os.listdir(target) == [LOCK]


def test_a_directory_holding_anything_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    (tmp_path / ".bashrc").write_text("keep me")
    with pytest.raises(ConfigError, match=r"is not empty \(it holds 1 entries, e.g. '.bashrc'\)"):
        claim(tmp_path)
    assert os.listdir(tmp_path) == [".bashrc"]
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        claim(tmp_path)


def _run(tmp_path: Path, data_root: Path, output_dir: Path) -> int:
    return main(
        [
            "run",
            "configs/mnist.yaml",
            f"data.root={data_root}",
            "data.max_train_samples=300",
            f"data.cache_dir={tmp_path / 'cache'}",  # nothing is decoded for a bad output.dir
            f"output.dir={output_dir}",
        ]
    )


def test_an_output_dir_that_cannot_be_made_is_one_line_and_exit_2(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    # Its parent is a file: the directory cannot be created.
    assert _run(tmp_path, data_root, file / "sub" / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output.dir: cannot create the run directory {file / 'sub'}")
    assert "Not a directory" in err and len(err.strip().splitlines()) == 1
    # It is a file itself.
    assert _run(tmp_path, data_root, file) == 2
    err = capsys.readouterr().err
    assert err == f"error: output.dir: {file} is a file, not a directory; choose a new directory\n"
    assert file.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_output_dir_is_one_line_and_exit_2(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert _run(tmp_path, data_root, locked / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output.dir: cannot create the run directory {locked / 'run'}")
    assert "Permission denied" in err and os.listdir(locked) == []


def test_a_read_only_file_system_is_one_line_and_nothing_is_left(tmp_path: Path) -> None:
    # /proc/sys is read-only even for root; a claim under it fails after trying to create.
    target = Path("/proc/sys/fl-lightning-test/run")
    with pytest.raises(ConfigError, match=r"output.dir: cannot create the run directory"):
        claim(target)
    assert not target.parent.exists()


def test_a_claim_made_by_a_failed_write_is_undone(tmp_path: Path, monkeypatch) -> None:
    real_open = os.open

    def full_disk(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(LOCK):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", full_disk)
    with pytest.raises(ConfigError, match=r"No space left on device"):
        claim(tmp_path / "a" / "b" / "run")
    assert os.listdir(tmp_path) == []  # the folders it made are gone again


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    write_atomically(target, lambda partial: torch.save({"w": 1}, partial))
    assert os.listdir(tmp_path) == ["last.ckpt"]

    def fail(obj: object, path: object) -> None:
        Path(str(path)).write_bytes(b"half")  # a partial write, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, lambda partial: torch.save({"w": 2}, partial))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no .tmp left, the old file untouched
    assert torch.load(target, weights_only=True) == {"w": 1}


def test_atomic_writes_are_fsynced_file_and_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomically(tmp_path / "x.pt", lambda partial: partial.write_bytes(b"data"))
    assert len(synced) == 2
    assert synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


def test_a_torn_last_line_of_metrics_is_skipped_with_a_warning(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.metrics.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "centralized_acc')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 3 is not a complete record"):
        assert run.last_round() == 1


@pytest.mark.parametrize(
    "line",
    ['{"round": 1e999}', '{"round": "2"}', '{"round": true}', '{"round": 1.5}', "[1]", "[" * 5000],
)
def test_a_record_without_an_integer_round_is_skipped_by_last_round_and_resume(
    line: str, tmp_path: Path
) -> None:
    from fl_lightning.server.resume import _cut_metrics

    run = RunDir(tmp_path)
    run.metrics.write_text(f'{{"round": 0}}\n{{"round": 1}}\n{line}\n')
    with pytest.warns(UserWarning, match=r"line 3 is not a complete record"):
        assert run.last_round() == 1
    _cut_metrics(run, 1)  # what --resume keeps: the same lines last_round counts
    assert run.metrics.read_text() == '{"round": 0}\n{"round": 1}\n'


def test_a_run_that_records_no_round_gives_its_directory_back(tmp_path: Path) -> None:
    # The review found an output.dir left holding only the lock after a run failed before
    # its first round: a rerun there was refused.
    new = claim(tmp_path / "new")
    (new.path / "tensorboard").mkdir()
    (new.path / "tensorboard" / "events").write_text("x")
    new.config.write_text("seed: 1\n")
    new.release()
    assert not new.path.exists()
    (tmp_path / "empty").mkdir()  # an empty folder the user made stays, empty
    existing = claim(tmp_path / "empty")
    existing.config.write_text("seed: 1\n")
    existing.release()
    assert existing.path.is_dir() and not any(existing.path.iterdir())
    claim(tmp_path / "empty")  # claimable again
    ran = claim(tmp_path / "ran")
    ran.metrics.write_text('{"round": 0}\n')
    ran.release()  # a run with a round keeps everything
    assert sorted(p.name for p in ran.path.iterdir()) == [LOCK, "metrics.jsonl"]


def test_a_deployment_that_records_no_round_keeps_its_logs_aside(tmp_path: Path) -> None:
    run = claim(tmp_path / "run")
    (run.path / "deployment").mkdir()
    (run.path / "deployment" / "superlink.log").write_text("why it failed\n")
    aside = run.release(keep=("deployment",))
    assert aside is not None and not run.path.exists()
    assert (aside / "deployment" / "superlink.log").read_text() == "why it failed\n"
