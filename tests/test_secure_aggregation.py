"""SecAgg+ through Flower's legacy API: same training, exact-to-quantization sums, dropouts."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.simulation import run_simulation

from fl_lightning.client_app import make_client_app
from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError
from fl_lightning.run.simulation import backend_config
from fl_lightning.server.rundir import create_run_dir
from fl_lightning.server_app import make_server_app
from tests.test_config import REPO
from tests.test_end_to_end import read_metrics

SECAGG = REPO / "configs" / "mnist_secagg.yaml"
THREE_CLIENTS = [
    "federation.num_clients=3",
    "secure_aggregation.num_shares=3",
    "secure_aggregation.reconstruction_threshold=2",
]


def run_cli(overrides: list[str]) -> None:
    command = [sys.executable, "-m", "fl_lightning.cli", "run", str(SECAGG), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_secure_sum_matches_plain_fedavg_to_the_quantization_step(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    common = [*tiny_overrides, *THREE_CLIENTS]
    run_cli([*common, "secure_aggregation.enabled=false", f"output.dir={plain}"])
    run_cli([*common, f"output.dir={secure}"])

    cfg = load_config(SECAGG, [*common])
    a = cfg.secure_aggregation
    step = 2 * a.clipping_range / a.quantization_range
    # Clients train deterministically, so both runs aggregate the very same updates. Each
    # of the 3 clients adds < 1 step of quantization error, scaled by max_weight / total
    # weight (about 1/3 here): the sum stays within one step.
    before = torch.load(plain / "checkpoints" / "round_0.ckpt", weights_only=False)["state_dict"]
    p = torch.load(plain / "checkpoints" / "round_1.ckpt", weights_only=False)["state_dict"]
    s = torch.load(secure / "checkpoints" / "round_1.ckpt", weights_only=False)["state_dict"]
    assert p.keys() == s.keys()
    moved = max((p[k] - before[k]).abs().max().item() for k in p)
    error = max((p[k] - s[k]).abs().max().item() for k in p)
    assert moved > 100 * step  # the models did change
    assert error <= step, (error, step)
    plain_metrics, secure_metrics = read_metrics(plain), read_metrics(secure)
    assert [r["round"] for r in secure_metrics] == [0, 1]
    assert secure_metrics[1]["secure_aggregation/clipped"] == 0.0
    assert secure_metrics[1]["test/accuracy"] == pytest.approx(
        plain_metrics[1]["test/accuracy"], abs=0.01
    )


def test_a_round_completes_when_a_client_drops_out_mid_protocol(
    tiny_overrides: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(
        SECAGG,
        [
            *tiny_overrides,
            "federation.num_clients=4",
            "secure_aggregation.num_shares=3",
            "secure_aggregation.reconstruction_threshold=2",
        ],
    )

    def drop_out(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Client 0 vanishes after the key exchange, before sending its masked update."""
        stage = msg.content.config_records.get("secaggplus_configs", {}).get("stage")
        if context.node_config["partition-id"] == 0 and stage == "collect_masked_vectors":
            raise ConnectionError("client 0 dropped out")
        return call_next(msg, context)

    run = create_run_dir(cfg)
    run_simulation(
        server_app=make_server_app(cfg, run, console=False),
        client_app=make_client_app(cfg, secure_mods=[drop_out]),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg),
    )
    records = read_metrics(run.path)
    assert [r["round"] for r in records] == [0, 1]
    assert records[1]["test/loss"] < records[0]["test/loss"]
    assert "failure(s) during secure aggregation" in caplog.text  # the dropout did happen


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            "secure_aggregation.reconstruction_threshold=6",
            "secure_aggregation.reconstruction_threshold",
        ),
        ("secure_aggregation.num_shares=4", "secure_aggregation.num_shares"),
        ("secure_aggregation.num_shares=7", "secure_aggregation.num_shares"),
        ("strategy.name=fedmedian", "strategy.name"),
        ("secure_aggregation.clipping_range=0", "secure_aggregation.clipping_range"),
    ],
)
def test_wrong_secure_aggregation_settings_fail_at_load(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        load_config(SECAGG, [override])


def test_client_dp_with_secure_aggregation_needs_client_side_clipping() -> None:
    client_dp = ["privacy.mode=client_dp", "privacy.noise_multiplier=1.0"]
    with pytest.raises(ConfigError, match=r"^privacy\.clipping: must be 'client'"):
        load_config(SECAGG, client_dp)
    load_config(SECAGG, [*client_dp, "privacy.clipping=client"])


def test_client_dp_on_top_of_secure_aggregation_clips_on_clients_and_accounts(
    tiny_overrides: list[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    clipping_norm = 0.05
    run_cli(
        [
            *tiny_overrides,
            *THREE_CLIENTS,
            "privacy.mode=client_dp",
            "privacy.clipping=client",
            f"privacy.clipping_norm={clipping_norm}",
            "privacy.noise_multiplier=0.0001",  # negligible noise: the clipping shows
        ]
    )
    before = torch.load(run / "checkpoints" / "round_0.ckpt", weights_only=False)["state_dict"]
    after = torch.load(run / "checkpoints" / "round_1.ckpt", weights_only=False)["state_dict"]
    update = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    # The mean of three deltas each clipped to 0.05, plus noise of std 0.0001 * 0.05 / 3.
    assert 0.01 < update <= clipping_norm * 1.01
    records = read_metrics(run)
    assert records[1]["epsilon"] > 0


def _evaluation(num_examples: object, loss: object, **metrics: object) -> tuple:
    from types import SimpleNamespace

    from flwr.common import Code, EvaluateRes, Status

    res = EvaluateRes(Status(Code.OK, ""), loss, num_examples, metrics)  # type: ignore[arg-type]
    return SimpleNamespace(cid="1", node_id=1), res


def test_hostile_evaluation_results_are_left_out_of_the_distributed_metrics() -> None:
    from fl_lightning.server.secure import _usable_evaluations, _weighted_mean

    honest = _evaluation(10, 0.5, **{"val/loss": 0.5, "val/accuracy": 0.9})
    hostile = [
        _evaluation(0, 0.5, **{"val/loss": 0.5}),  # a zero weight: Flower divides by the sum
        _evaluation(-10, 0.5),
        _evaluation(2.5, 0.5),
        _evaluation(10, float("nan")),
        _evaluation(10, 0.5, **{"val/loss": float("inf")}),
        _evaluation(10, 0.5, **{"a\nname": 1.0}),  # not a printable name
        _evaluation(10, 0.5, **{"x" * 200: 1.0}),  # too long a name
    ]
    assert _usable_evaluations([honest, *hostile]) == [honest]  # type: ignore[list-item]
    # A name only a minority sends never reaches the logs.
    reports = [(10, {"val/loss": 0.5}), (10, {"val/loss": 0.7}), (5, {"val/loss": 0.1, "own": 9})]
    assert _weighted_mean(reports) == {"val/loss": pytest.approx(0.5)}  # type: ignore[arg-type]


def test_dp_sgd_epsilons_are_credited_to_the_census_partition_of_the_node() -> None:
    # Under SecAgg+ a client sends its epsilon in the clear (no accountant): it is credited
    # to the partition its node holds, and only if the client's plan gives it.
    from types import SimpleNamespace

    from fl_lightning.privacy.ledger import PrivacyLedger
    from fl_lightning.server.secure import _credit_epsilons

    cfg = load_config(REPO / "configs" / "mnist_dp_sgd.yaml")
    ledger = PrivacyLedger(cfg, [100] * 5)
    ledger.record_sampled([3, 4])
    honest = ledger.client_epsilon(3, 1)

    def fit(node: int, **metrics: object) -> tuple:
        return SimpleNamespace(cid=str(node), node_id=node), SimpleNamespace(metrics=metrics)

    results = [
        fit(7, **{"privacy/epsilon": honest, "partition-id": 0}),  # claims another partition
        fit(8, **{"privacy/epsilon": float("nan")}),
        fit(9, **{"privacy/epsilon": honest}),  # a node the census did not bind
    ]
    _credit_epsilons(ledger, results, {7: 3, 8: 4})  # type: ignore[arg-type]
    assert ledger.trained == [0, 0, 0, 1, 0]


def test_secagg_samples_the_partitions_the_message_api_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Node ids are random per run: the draw must depend on (seed, round) and partitions only.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # Flower stamps messages with these
        monkeypatch.setattr(TaskIdentity, name, 1)
    from types import SimpleNamespace

    from flwr.app import ConfigRecord
    from flwr.common import ndarrays_to_parameters

    from fl_lightning.server.secure import SecureFedAvg
    from fl_lightning.server.strategy import build_strategy
    from tests.test_strategy import FakeGrid, census, global_arrays, recorder

    cfg = load_config(REPO / "configs" / "mnist.yaml", ["federation.fraction_train=0.4"])
    fraction = cfg.federation.fraction_train  # as both paths' strategies are built

    class Clients:
        def __init__(self, nodes: dict[int, int]) -> None:
            self.proxies = {str(n): SimpleNamespace(node_id=n) for n in nodes}

        def wait_for(self, num_clients: int, timeout: int) -> bool:
            return True

        def all(self) -> dict:
            return self.proxies

    def secagg(nodes: dict[int, int], server_round: int) -> list[int]:
        strategy = SecureFedAvg(
            cfg, recorder(), {"w": torch.zeros(2)}, 1.0, nodes, fraction_fit=fraction
        )
        sent = strategy.configure_fit(
            server_round,
            ndarrays_to_parameters([]),
            Clients(nodes),  # type: ignore[arg-type]
        )
        return sorted(nodes[proxy.node_id] for proxy, _ in sent)

    def message_api(server_round: int) -> list[int]:
        strategy = build_strategy(
            cfg, recorder(), census(), fraction_train=fraction, min_available_nodes=5
        )
        grid = FakeGrid()  # nodes 1..5 hold partitions 0..4
        sent = strategy.configure_train(server_round, global_arrays(), ConfigRecord(), grid)  # type: ignore[arg-type]
        return sorted(m.metadata.dst_node_id - 1 for m in sent)

    one_run = {100 + p: p for p in range(5)}
    another = {9000 - 7 * p: p for p in range(5)}
    for server_round in (1, 2, 3):
        drawn = secagg(one_run, server_round)
        assert len(drawn) == 2
        assert drawn == secagg(another, server_round) == message_api(server_round)
    assert len({tuple(secagg(one_run, r)) for r in range(1, 9)}) > 1  # rounds draw anew
