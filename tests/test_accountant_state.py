"""A DP-SGD client's accountant state: one check, made by the reply screen and by --resume."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant

from fl_lightning.config.load import load_config
from fl_lightning.privacy.accountant_state import MAX_ACCOUNTANT_CHARS, accountant_state_problem
from fl_lightning.server.reply_screen import TRAIN
from fl_lightning.server.strategy import LightningFedAvg
from fl_lightning.server.strategy_state import Malformed, decode_strategy_state
from fl_lightning.vocabulary import ACCOUNTANT_RECORD
from tests.conftest import REPO
from tests.test_strategy import task_identity

__all__ = ["task_identity"]  # the autouse fixture Flower's messages need


def honest_accountant(steps: int = 3) -> str:
    """What an honest DP-SGD client sends: its Opacus RDPAccountant's state_dict as JSON."""
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    return json.dumps(dict(accountant.state_dict()))  # as dp_sgd.ClientDPSGD.state() does


def _state(history: str, mechanism: str = '"rdp"') -> str:
    return f'{{"history": {history}, "mechanism": {mechanism}}}'


MALFORMED: dict[str, str] = {
    "not JSON": "not json",
    "a JSON list": "[]",
    "an empty object": "{}",
    "no mechanism": '{"history": [[1.1, 0.01, 3]]}',
    "an extra key": '{"history": [], "mechanism": "rdp", "x": 1}',
    "another mechanism": _state("[]", '"gdp"'),
    "history not a list": _state('{"a": 1}'),
    "a pair, not a triple": _state("[[1.1, 0.01]]"),
    "negative noise": _state("[[-1, 0.01, 3]]"),
    "NaN noise": _state("[[NaN, 0.01, 3]]"),
    "infinite noise": _state("[[1e999, 0.01, 3]]"),
    "sample rate above 1": _state("[[1.1, 1.5, 3]]"),
    "zero steps": _state("[[1.1, 0.01, 0]]"),
    "fractional steps": _state("[[1.1, 0.01, 2.5]]"),
    "steps a bool": _state("[[1.1, 0.01, true]]"),
    "noise a string": _state('[["1.1", 0.01, 3]]'),
    "an int of 5000 digits": _state(f"[[1.1, 0.01, 1{'0' * 5000}]]"),
    "nested too deeply": "[" * 100_000,
    "over the size bound": " " * MAX_ACCOUNTANT_CHARS + "{}",
}


def test_an_honest_clients_state_passes_and_opacus_loads_what_passes() -> None:
    for text in (honest_accountant(), honest_accountant(0), _state("[[0, 1, 1], [2, 0.5, 7]]")):
        assert accountant_state_problem(text) is None, text
        state = json.loads(text)
        state["history"] = [tuple(step) for step in state["history"]]
        RDPAccountant().load_state_dict(state)  # as dp_sgd.ClientDPSGD loads it


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_state_is_refused_with_a_reason(text: str) -> None:
    problem = accountant_state_problem(text)
    assert isinstance(problem, str) and problem and "\n" not in problem


@pytest.mark.parametrize(
    "text", [honest_accountant(), *MALFORMED.values()], ids=["honest", *MALFORMED.keys()]
)
def test_the_reply_screen_and_resume_agree(text: str) -> None:
    from tests.test_reply_screen import attacked, screen_for, train_reply
    from tests.test_strategy import global_arrays

    screen = screen_for(load_config(REPO / "configs" / "mnist_dp_sgd.yaml"))

    def dp_reply(content: RecordDict) -> None:
        content.metric_records["metrics"]["privacy/epsilon"] = 0.5
        content[ACCOUNTANT_RECORD] = ConfigRecord({"state": text})

    screened = screen.problem(attacked(train_reply(4), dp_reply), TRAIN, global_arrays())
    weights = {"w": torch.zeros(2, 3)}
    try:
        decode_strategy_state(LightningFedAvg, {"accountants": {4: text}}, weights, 5)
        resumable = True
    except Malformed:
        resumable = False
    assert (screened is None) == resumable == (accountant_state_problem(text) is None)
