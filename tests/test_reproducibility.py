"""Same seed, same numbers: two runs of one config write the same metrics.jsonl."""

from pathlib import Path

from tests.test_end_to_end import read_metrics
from tests.test_faults import simulate


def without_timings(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "seconds" and not k.startswith("time_")}
        for r in records
    ]


def test_the_same_config_twice_gives_identical_metrics(data_root: Path, tmp_path: Path) -> None:
    # Half the clients per round: which ones must not depend on Flower's random node ids.
    overrides = ["federation.fraction_train=0.5", "federation.fraction_evaluate=0.5"]
    first = read_metrics(simulate(data_root, tmp_path / "a", overrides, [], clients=4).path)
    second = read_metrics(simulate(data_root, tmp_path / "b", overrides, [], clients=4).path)
    assert [r["round"] for r in first] == [0, 1, 2]
    assert without_timings(first) == without_timings(second)
