"""Real simulations with differential privacy: epsilon per round, a budget that ends a run."""

import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_lightning.config.load import load_config
from fl_lightning.data.partition import client_splits
from fl_lightning.privacy.dp_sgd import plan
from tests.test_config import MNIST, REPO
from tests.test_end_to_end import read_metrics

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def run_cli(config: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fl_lightning.cli", "run", str(config), *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_dp_sgd_run_stops_cleanly_before_exceeding_max_epsilon(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    config = REPO / "configs" / "mnist_dp_sgd.yaml"
    overrides = [*tiny_overrides, "federation.num_rounds=3", "privacy.noise_multiplier=1.5",
                 "privacy.target_epsilon=null", "data.batch_size=64"]  # fmt: skip
    cfg = load_config(config, overrides)
    sizes = [len(train) for train, _ in client_splits(cfg.data, 2, cfg.seed)]
    delta = cfg.privacy.delta
    # A budget that fits two rounds of the hungriest client, not three.
    two_rounds = max(plan(cfg, n).epsilon(2, delta) for n in sizes)
    three_rounds = max(plan(cfg, n).epsilon(3, delta) for n in sizes)
    budget = (two_rounds + three_rounds) / 2
    result = run_cli(config, [*overrides, f"privacy.max_epsilon={budget}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped early: round 3 not started" in result.stderr

    run = tmp_path / "run"
    records = read_metrics(run)
    assert [r["round"] for r in records] == [0, 1, 2]
    epsilons = [r["epsilon"] for r in records]
    assert epsilons[0] == 0 < epsilons[1] < epsilons[2] <= budget
    assert epsilons[2] == pytest.approx(two_rounds, rel=1e-9)  # clients' own accountants agree
    assert (run / "stopped.txt").exists() and (run / "checkpoints" / "round_2.ckpt").exists()
    assert not (run / "checkpoints" / "round_3.ckpt").exists()
    assert "round 3 not started" in (run / "summary.md").read_text()


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_client_dp_reports_the_accounted_epsilon_each_round(
    tiny_overrides: list[str], tmp_path: Path, clipping: str
) -> None:
    overrides = [
        *tiny_overrides,
        "federation.num_rounds=2",
        "privacy.mode=client_dp",
        "privacy.noise_multiplier=2.0",
        "privacy.clipping_norm=0.5",
        f"privacy.clipping={clipping}",
    ]
    result = run_cli(MNIST, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    for releases, record in enumerate(records):
        rdp = compute_rdp(q=1.0, noise_multiplier=2.0, steps=releases, orders=ORDERS)
        expected = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)[0] if releases else 0.0
        assert record["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert records[2]["epsilon"] > records[1]["epsilon"] > 0
    assert "| epsilon |" in (tmp_path / "run" / "summary.md").read_text()
