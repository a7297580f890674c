from pathlib import Path

import pytest
import torch
from torch import nn

from fl_lightning.config.load import load_config
from fl_lightning.errors import ConfigError
from fl_lightning.models.build import build_model, builtin_spec
from fl_lightning.models.networks import MLP, CIFAR10Net, MNISTNet
from tests.conftest import REPO
from tests.test_config import MNIST

# (layer type, output shape) rows of the seed report's Tables I and II.
TABLE_I = [
    (nn.Conv2d, (32, 24, 24)),
    (nn.MaxPool2d, (32, 12, 12)),
    (nn.Conv2d, (64, 8, 8)),
    (nn.MaxPool2d, (64, 4, 4)),
    (nn.Flatten, (1024,)),
    (nn.Linear, (120,)),
    (nn.Linear, (84,)),
    (nn.Linear, (10,)),
]
TABLE_II = [
    (nn.Conv2d, (64, 32, 32)),
    (nn.BatchNorm2d, (64, 32, 32)),
    (nn.MaxPool2d, (64, 16, 16)),
    (nn.Conv2d, (128, 16, 16)),
    (nn.BatchNorm2d, (128, 16, 16)),
    (nn.MaxPool2d, (128, 8, 8)),
    (nn.Conv2d, (256, 8, 8)),
    (nn.BatchNorm2d, (256, 8, 8)),
    (nn.MaxPool2d, (256, 4, 4)),
    (nn.Flatten, (4096,)),
    (nn.Linear, (512,)),
    (nn.Dropout, (512,)),
    (nn.Linear, (256,)),
    (nn.Linear, (10,)),
]


def layer_outputs(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[type, tuple[int, ...]]]:
    rows = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: rows.append((type(mod), tuple(out.shape[1:]))))
        for m in model.net
        if not isinstance(m, nn.ReLU)
    ]
    model.eval()
    model(torch.zeros(2, *shape))
    for h in hooks:
        h.remove()
    return rows


@pytest.mark.parametrize(
    ("cls", "shape", "table", "params"),
    [
        # conv 32*(1*25+1) + 64*(32*25+1) + fc 1024*120+120 + 120*84+84 + 84*10+10
        (MNISTNet, (1, 28, 28), TABLE_I, 832 + 51264 + 123000 + 10164 + 850),
        # convs 64*(27+1), 128*(576+1), 256*(1152+1); BN 2*C each;
        # fc 4096*512+512, 512*256+256, 256*10+10
        (
            CIFAR10Net,
            (3, 32, 32),
            TABLE_II,
            1792 + 73856 + 295168 + 2 * (64 + 128 + 256) + 2097664 + 131328 + 2570,
        ),
    ],
)
def test_architectures_match_the_seed_tables(cls, shape, table, params) -> None:
    model = cls()
    assert cls.input_shape == shape  # what config validation matches the data against
    assert layer_outputs(model, shape) == table
    assert sum(p.numel() for p in model.parameters()) == params
    dropouts = [m.p for m in model.net if isinstance(m, nn.Dropout)]
    assert dropouts == ([0.5] if cls is CIFAR10Net else [])


def test_mlp_is_784_128_10() -> None:
    model = MLP()
    assert [m.weight.shape for m in model.net if isinstance(m, nn.Linear)] == [
        (128, 784),
        (10, 128),
    ]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_build_model_follows_config() -> None:
    cfg = load_config(MNIST, ["model.name=mlp", "optimizer.name=sgd", "optimizer.lr=0.1"])
    model = build_model(cfg, num_classes=10)
    assert isinstance(model, MLP)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.1


def test_tanh_activation_keeps_the_architectures_weights() -> None:
    relu, tanh = MNISTNet(), MNISTNet(activation="tanh")
    assert relu.state_dict().keys() == tanh.state_dict().keys()
    kinds = {type(m) for m in tanh.modules()}
    assert torch.nn.Tanh in kinds and torch.nn.ReLU not in kinds


def test_batchnorm_recompute_needs_a_module_with_batchnorm_layers() -> None:
    # Found by inspecting the built module, whatever its class: no table of model names.
    with pytest.raises(ConfigError, match=r"model.name: mnist_net has no BatchNorm layer"):
        build_model(load_config(MNIST, ["strategy.batchnorm=recompute"]), num_classes=10)
    cifar = load_config(REPO / "configs" / "cifar10.yaml", ["strategy.batchnorm=recompute"])
    assert isinstance(build_model(cifar, num_classes=10), CIFAR10Net)


def test_model_name_is_short_for_a_class_path_and_its_init_args(data_root: Path) -> None:
    cfg = load_config(REPO / "configs" / "mnist.yaml", [f"data.root={data_root}"])
    spec = builtin_spec(cfg)
    assert spec.class_path == "fl_lightning.models.MNISTNet"
    # configs/mnist_class_path.yaml names the same module the way a user names theirs.
    named = load_config(
        REPO / "configs" / "mnist_class_path.yaml", [f"data.init_args.root={data_root}"]
    )
    assert named.model.class_path == spec.class_path
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(named)
    assert type(a) is type(b) and a.hparams == b.hparams
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_built_in_architecture_refuses_data_of_another_shape() -> None:
    # The class states its input shape (MNISTNet.input_shape); the CLI builds the model
    # before any process starts, so this is one line and exit 2 there.
    with pytest.raises(ConfigError, match=r"model.name: cifar10_net takes inputs of shape"):
        build_model(load_config(MNIST, ["model.name=cifar10_net"]), num_classes=10)
