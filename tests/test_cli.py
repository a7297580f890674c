import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fl_lightning(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl_lightning.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["federation.num_round=2"],
            "error: federation.num_round: unknown config key (did you mean",
        ),
        (["federation.num_clients=0"], "error: federation.num_clients: must be >= 1, got 0"),
        (
            ["data.root=/nonexistent", "data.download=false"],
            "error: MNIST not found under data.root=/nonexistent",
        ),
        (
            ["trainer.accelerator=gpu"],
            "error: federation.client_resources.num_gpus: is 0 while trainer.accelerator",
        ),
    ],
)
def test_bad_input_exits_with_one_line(
    overrides: list[str], message: str, tmp_path: Path, data_root: Path
) -> None:
    result = fl_lightning(
        "run",
        "configs/mnist.yaml",
        f"data.root={data_root}",
        *overrides,
        f"output.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written before the input is valid


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    result = fl_lightning(
        "run", "configs/mnist.yaml", f"data.root={data_root}", f"output.dir={tmp_path}"
    )
    assert result.returncode == 2
    assert "already holds a run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from fl_lightning.cli import main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip().endswith("False")
    assert "fl-lightning" in result.stdout
    assert (
        time.perf_counter() - started < 10
    )  # generous: a loaded CI machine; the real figure is ~0.1 s


def test_deploy_local_checks_its_input_before_starting_anything(tmp_path: Path) -> None:
    result = fl_lightning("deploy-local", "configs/mnist.yaml", "--gpus", "zero")
    assert result.returncode == 2
    assert "argument --gpus: expected CUDA device indices like 0 or 0,1" in result.stderr
    # Overrides may follow options; a bad one fails at load, before any process starts.
    result = fl_lightning(
        "deploy-local", "configs/mnist.yaml", "--nodes", "0", f"output.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: federation.num_clients: must be >= 1, got 0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("node_configs", "message"),
    [
        (["data-root=/x"], "write it as key=value pairs, strings quoted"),
        (['partition-id=1 data-root="/tmp"'], "partition-id is set by deploy-local"),
        (['data-root="/tmp"'], "1 of 2 SuperNodes name a data-root; give every node its own"),
        (['data-root="/nonexistent"'] * 2, "data-root /nonexistent is not a folder"),
        (['data-root="relative"'] * 2, "give the site's data folder as an absolute path"),
    ],
)
def test_each_supernodes_settings_are_checked_before_any_process_starts(
    node_configs: list[str], message: str, tmp_path: Path, data_root: Path
) -> None:
    flags = [f"--node-config={text}" for text in node_configs]
    run = tmp_path / "run"
    result = fl_lightning(
        "deploy-local", "configs/mnist.yaml", "--nodes", "2", *flags,
        f"data.root={data_root}", f"output.dir={run}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not run.exists()
