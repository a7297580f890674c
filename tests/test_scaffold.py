"""`fl-lightning init`: the project it writes federates as written, and examples/digits is it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_lightning.cli import main
from fl_lightning.run.processes import flower_executable, free_port, kill_marked
from fl_lightning.run.scaffold import write_project
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "digits"
# What the template's LightningModule logs, under its own names.
METRICS = {"train/loss", "val/loss", "val/accuracy", "test/loss", "test/accuracy"}
TINY = [
    "data.init_args.max_train_samples=300",
    "data.init_args.max_test_samples=200",
    "federation.num_clients=2",
    "federation.num_rounds=1",
]


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`fl-lightning ARGS` started in `cwd`, as a user runs it."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [sys.executable, "-m", "fl_lightning.cli", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def final_metrics(run: Path) -> dict[str, float]:
    """The last record of the run's metrics.jsonl."""
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path (Python's bytecode caches left out)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_init_writes_a_project_that_federates_from_another_folder(
    tmp_path: Path, data_root: Path
) -> None:
    project = tmp_path / "my_project"
    assert main(["init", str(project), "--data-root", str(data_root)]) == 0
    written = set(tree(project))
    assert {"config.yaml", "README.md", "pyproject.toml", "digits/model.py"} <= written

    # Started outside the project: its classes import from the config's folder.
    run = tmp_path / "run"
    result = run_cli(tmp_path, "run", str(project / "config.yaml"), *TINY, f"output.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(final_metrics(run)) >= METRICS


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_init_refuses_a_non_empty_folder_in_one_line_and_writes_nothing(
    existing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "taken"
    if existing == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    before = tree(tmp_path)

    assert main(["init", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err, err
    assert tree(tmp_path) == before


def test_init_fills_an_empty_folder_and_writes_an_absolute_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(["init", "empty"]) == 0
    config = (tmp_path / "empty" / "config.yaml").read_text()
    # The default data root, absolute: the project runs from any working directory.
    assert f"root: {json.dumps(str((tmp_path / 'empty' / 'data').resolve()))}" in config


def test_the_example_is_the_project_init_writes(tmp_path: Path) -> None:
    # After a change to the template, regenerate the example (from the repository root):
    # rm -r examples/digits && python -c "from pathlib import Path; from fl_lightning.run.scaffold
    # import write_project; write_project(Path('examples/digits'), '../shared/data')"
    write_project(tmp_path / "digits", "../shared/data")
    assert tree(EXAMPLE) == tree(tmp_path / "digits")


def test_the_example_federates_from_the_repository_root(tmp_path: Path, data_root: Path) -> None:
    run = tmp_path / "run"
    config = "examples/digits/config.yaml"
    result = run_cli(
        REPO, "run", config, f"data.init_args.root={data_root}", *TINY, f"output.dir={run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(final_metrics(run)) >= METRICS


def test_flwr_run_runs_the_project_init_writes(tmp_path: Path, data_root: Path) -> None:
    project = tmp_path / "my_project"
    assert main(["init", str(project), "--data-root", str(data_root)]) == 0
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(home),  # Flower's config, app copies and SuperLink state: ours alone
        # `flwr run` starts its local SuperLink on these ports: our own, not another's.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    run = tmp_path / "run"
    overrides = " ".join([*TINY, f"output.dir={run}"])
    command = [
        flower_executable("flwr"),
        *("run", str(project), "--stream"),
        *("--federation-config", "num-supernodes=2"),
        *("--run-config", f"overrides='{overrides}'"),
    ]
    try:
        # Started outside the project, as a SuperLink started by an earlier `flwr run`
        # elsewhere is: config.yaml must come from the app Flower unpacked.
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        stop_processes_of(home)
    assert result.returncode == 0, result.stderr[-3000:]
    # `flwr run` exits 0 after a failed run too: its streamed log says what went wrong.
    assert (run / "metrics.jsonl").is_file(), result.stdout[-3000:]
    assert set(final_metrics(run)) >= METRICS
    assert (run / "checkpoints" / "last.ckpt").is_file()


def stop_processes_of(home: Path) -> None:
    """Kill what `flwr run` left running with FLWR_HOME=`home` (its SuperLink, the simulation)."""
    left = kill_marked(str(home), "FLWR_HOME", attempts=100)
    assert not left, f"processes with FLWR_HOME={home} still running: {left}"
