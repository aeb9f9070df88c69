"""The image models of the zoo: every model x every norm kind (shapes, gradients, train/eval, state dicts),
the CIFAR ResNets' sizes and shortcuts, SkipInit, the MLP's norm placement and init, Inception-v3, errors."""

from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnzoo import create_model
from bnzoo.models import BUILTIN_MODELS, model_options
from bnzoo.models.inception import inception_v3_min_image_size
from bnzoo.models.resnet import BasicBlock, ShortcutA
from bnzoo.norms import BUILTIN_NORMS, FrozenBatchNorm

IMAGE_MODELS = sorted(name for name in BUILTIN_MODELS if "image_size" in model_options(name))
NORMS = list(BUILTIN_NORMS)
OWN_MODELS = [
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "timm_resnet18",
    "timm_resnet34",
    "timm_resnet50",
    "bn_inception_small",
    "timm_inception_v3",
    "mlp",
]
IMAGE_SIZE = {"timm_inception_v3": 75}  # its smallest input; 32 for the others
BATCH = {"timm_inception_v3": 2}  # the largest model: the smallest batch that batch statistics allow
NUM_CLASSES = 5
UPDATES_RUNNING_STATS = {"bn", "renorm"}


def build(name: str, norm: str, **options: object) -> nn.Module:
    options.setdefault("image_size", IMAGE_SIZE.get(name, 32))
    return create_model(name, norm=norm, num_classes=NUM_CLASSES, **options)


def images(name: str, batch: int | None = None, seed: int = 1) -> Tensor:
    size = IMAGE_SIZE.get(name, 32)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch or BATCH.get(name, 4), 3, size, size, generator=generator)


def labels(x: Tensor) -> Tensor:
    return torch.arange(x.shape[0]) % NUM_CLASSES


def loss_of(output: Tensor | tuple[Tensor, ...], y: Tensor) -> Tensor:
    outputs = output if isinstance(output, tuple) else (output,)
    return sum(F.cross_entropy(o, y) for o in outputs)  # type: ignore[return-value]


def unblock_zero_inits(model: nn.Module) -> None:
    """Make every all-zero parameter nonzero: a zero SkipInit gain or zero-initialized norm weight stops the
    gradient of its residual branch by design, which would hide whether backward reaches the branch."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.fill_(0.5)


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm))


# ----------------------------------------------------------------------------------------------------------
# Registry


def test_every_model_of_this_family_is_registered_with_the_image_options() -> None:
    assert set(OWN_MODELS) <= set(IMAGE_MODELS)
    for name in OWN_MODELS:
        options = model_options(name)
        assert options["norm"] == "bn" and options["norm_options"] is None, name
        assert options["num_classes"] == 10 and options["in_chans"] == 3, name
        assert isinstance(options["image_size"], int), name


# ----------------------------------------------------------------------------------------------------------
# Every model x every norm kind


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_forward_and_backward_reach_every_parameter(name: str, norm: str) -> None:
    model = build(name, norm).train()
    unblock_zero_inits(model)
    x = images(name)
    output = model(x)
    assert output.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(output).all()
    loss_of(output, labels(x)).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{parameter_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.any(), f"{parameter_name} got an all-zero gradient"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_train_eval_and_state_dict_round_trip(name: str, norm: str) -> None:
    model = build(name, norm).train()
    x = images(name)
    before = buffers(model)
    with torch.no_grad():
        model(x)
        for parameter in model.parameters():  # move every parameter away from its initial value
            parameter.add_(0.01 * torch.randn_like(parameter))
    after_train = buffers(model)
    changed = [k for k in before if not torch.equal(before[k], after_train[k])]
    if norm in UPDATES_RUNNING_STATS:
        assert any(k.endswith("running_mean") for k in changed), "training did not update the running mean"
    else:
        assert changed == [], f"{norm!r} changed buffers in training: {changed[:3]}"

    model.eval()
    with torch.no_grad():
        expected, again, single = model(x), model(x), model(x[:1])
    assert torch.isfinite(expected).all()
    assert torch.equal(expected, again), "eval output is not deterministic"
    torch.testing.assert_close(single, expected[:1], rtol=1e-4, atol=1e-5)  # no dependence on the batch
    assert all(torch.equal(b, after_train[k]) for k, b in buffers(model).items()), "eval changed a buffer"

    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)
    torch.manual_seed(123)
    fresh = build(name, norm).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), expected)  # the load below is what makes them agree
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    if norm in UPDATES_RUNNING_STATS:  # eval normalizes with the running statistics
        with torch.no_grad():
            for key, buffer in model.named_buffers():
                if key.endswith("running_var"):
                    buffer.mul_(4.0)
            rescaled = model(x)
        assert not torch.allclose(rescaled, expected), "eval output ignores the running variance"


@pytest.mark.parametrize("name", ["resnet20", "timm_resnet18", "bn_inception_small", "timm_inception_v3", "mlp"])
def test_models_pickle(name: str) -> None:
    model = build(name, "renorm").eval()
    x = images(name)
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), model(x))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_norm_comes_from_bnzoo(name: str) -> None:
    """One bnzoo norm per convolution (per hidden layer for the MLP), none from torch or timm directly."""
    model = build(name, "gn")
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(type(m).__module__.startswith("bnzoo.norms") for m in norms)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1] if not convs else []
    assert len(norms) == len(convs) + len(hidden)


@pytest.mark.parametrize("name", ["resnet20", "timm_resnet18", "bn_inception_small", "timm_inception_v3", "mlp"])
def test_norm_options_reach_every_norm(name: str) -> None:
    model = build(name, "renorm", norm_options={"r_max": 2.0, "d_max": 1.0})
    renorms = [m for m in model.modules() if hasattr(m, "r_max")]
    assert renorms and all(m.r_max == 2.0 and m.d_max == 1.0 for m in renorms)


# ----------------------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2015, Sec. 4.2)


def cifar_resnet_parameters(n: int, norm_params_per_channel: int, conv_bias: bool, gains: bool) -> int:
    """Independent count from the architecture: a 3x3 stem conv (3 -> 16), 3 stages of n blocks of two 3x3
    convs with a norm after each (16, 32, 64 channels), a 64 -> 10 fully connected layer."""

    def conv3x3(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + (c_out if conv_bias else 0)

    total = conv3x3(3, 16) + norm_params_per_channel * 16
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv3x3(c_in, width) + conv3x3(width, width) + 2 * norm_params_per_channel * width
            total += 1 if gains else 0
            c_in = width
    return total + 64 * 10 + 10


@pytest.mark.parametrize(("depth", "paper"), [(20, "0.27"), (32, "0.46"), (44, "0.66"), (56, "0.85"), (110, "1.7")])
def test_cifar_resnet_parameter_counts(depth: int, paper: str) -> None:
    n = (depth - 2) // 6
    assert 6 * n + 2 == depth
    model = create_model(f"resnet{depth}")
    count = sum(p.numel() for p in model.parameters())
    assert count == cifar_resnet_parameters(n, norm_params_per_channel=2, conv_bias=False, gains=False)
    decimals = len(paper.split(".")[1])
    assert f"{count / 1e6:.{decimals}f}" == paper  # the paper's Table 6 figure
    # without a norm: no norm parameters, a bias on every conv, one SkipInit gain per block
    plain = create_model(f"resnet{depth}", norm="none")
    expected = cifar_resnet_parameters(n, norm_params_per_channel=0, conv_bias=True, gains=True)
    assert sum(p.numel() for p in plain.parameters()) == expected


def test_option_a_shortcut_is_subsampling_and_zero_padding() -> None:
    x = torch.randn(2, 16, 7, 7)
    shortcut = ShortcutA(16, 32, stride=2)
    assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    expected = torch.zeros(2, 32, 4, 4)
    for i in range(4):
        for j in range(4):
            expected[:, :16, i, j] = x[:, :, 2 * i, 2 * j]
    assert torch.equal(shortcut(x), expected)
    with pytest.raises(ValueError, match="32 -> 16"):
        ShortcutA(32, 16, stride=1)


@pytest.mark.parametrize("image_size", [28, 32])
def test_cifar_resnet_stages_and_shortcuts(image_size: int) -> None:
    model = create_model("resnet20", in_chans=1, image_size=image_size)
    sizes = []
    for stage in model.stages:
        stage.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape[1:])))
    assert model(torch.randn(2, 1, image_size, image_size)).shape == (2, 10)
    s = image_size
    assert sizes == [
        (16, s, s),
        (32, math.ceil(s / 2), math.ceil(s / 2)),
        (64, math.ceil(s / 4), math.ceil(s / 4)),
    ]
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # at the two stage transitions; elsewhere the identity
    assert not [p for m in model.modules() if isinstance(m, BasicBlock) for p in m.shortcut.parameters()]


def block_outputs_equal_shortcuts(model: nn.Module, x: Tensor) -> bool:
    """Whether every residual block of ``model`` returns relu(shortcut(input)): its branch adds nothing."""
    records: list[bool] = []

    def check(block: nn.Module, inputs: tuple[Tensor], output: Tensor) -> None:
        shortcut = getattr(block, "shortcut", None) or getattr(block, "downsample", None) or nn.Identity()
        records.append(torch.allclose(output, torch.relu(shortcut(inputs[0])), atol=1e-6))

    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    handles = [b.register_forward_hook(check) for b in blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return len(records) == len(blocks) > 0 and all(records)


@pytest.mark.parametrize(("name", "steps"), [("resnet20", 15), ("timm_resnet18", 5), ("timm_resnet50", 5)])
def test_skip_init_with_norm_none(name: str, steps: int) -> None:
    x = images(name, batch=8)
    model = build(name, "none")
    gains = [p for n, p in model.named_parameters() if n.endswith("gain")]
    blocks = [m for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")]
    assert len(gains) == len(blocks) and all(g.item() == 0.0 for g in gains)
    assert block_outputs_equal_shortcuts(model, x)  # every block starts as the identity (De & Smith 2020)
    with torch.no_grad():
        output = model.eval()(x)
    assert torch.isfinite(output).all() and 1e-3 < output.std().item() < 10.0

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    y = labels(x)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0]
    assert any(g.item() != 0.0 for g in gains)  # the residual branches switched on

    off = build(name, "none", skip_init=False)
    assert not [n for n, _ in off.named_parameters() if n.endswith("gain")]


def test_skip_init_and_zero_init_residual_options() -> None:
    x = images("resnet20")
    zeroed = create_model("resnet20", norm="ln", zero_init_residual=True)
    last_norms = [m.conv2.norm for m in zeroed.modules() if isinstance(m, BasicBlock)]
    assert len(last_norms) == 9 and all(not n.weight.any() for n in last_norms)
    assert block_outputs_equal_shortcuts(zeroed.eval(), x)
    assert not block_outputs_equal_shortcuts(create_model("resnet20", norm="ln").eval(), x)
    # with SkipInit on, its zero gain does the job; zeroing the norm too would leave neither a gradient
    both = create_model("resnet20", norm="bn", skip_init=True, zero_init_residual=True)
    assert all(m.conv2.norm.weight.eq(1).all() for m in both.modules() if isinstance(m, BasicBlock))
    assert block_outputs_equal_shortcuts(both.eval(), x)
    # timm keeps its default zero_init_last=True; False leaves the last BN weight at 1
    assert not create_model("timm_resnet18").layer1[0].bn2.weight.any()
    assert create_model("timm_resnet18", zero_init_residual=False).layer1[0].bn2.weight.eq(1).all()


# ----------------------------------------------------------------------------------------------------------
# Inception


def test_bn_inception_small_structure() -> None:
    model = create_model("bn_inception_small", norm="bn", in_chans=1, image_size=28)
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 1e6  # trainable on a 2-core CPU
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {c.kernel_size for c in convs} == {(1, 1), (3, 3)}  # double 3x3 instead of 5x5
    assert all(c.bias is None for c in convs)  # BN's beta replaces the conv bias
    plain = create_model("bn_inception_small", norm="none", activation="sigmoid")
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    activations = [m for m in plain.modules() if isinstance(m, (nn.ReLU, nn.Sigmoid))]
    assert activations and all(isinstance(m, nn.Sigmoid) for m in activations)
    half = create_model("bn_inception_small", width=0.5)
    assert half.fc.in_features == model.fc.in_features // 2


def test_bn_inception_small_unit_is_conv_norm_act() -> None:
    model = create_model("bn_inception_small", norm="bn", activation="sigmoid")
    unit = model.stem
    order: list[str] = []
    for child_name in ("conv", "norm", "act"):
        getattr(unit, child_name).register_forward_hook(lambda m, i, o, n=child_name: order.append(n))
    x = torch.randn(4, 3, 32, 32)
    out = unit(x)
    assert order == ["conv", "norm", "act"]
    pre = F.batch_norm(unit.conv(x), None, None, unit.norm.weight, unit.norm.bias, training=True)
    torch.testing.assert_close(out, torch.sigmoid(pre))


def test_inception_v3_min_image_size() -> None:
    assert inception_v3_min_image_size(aux_logits=False) == 75
    assert inception_v3_min_image_size(aux_logits=True) == 299
    model = create_model("timm_inception_v3", image_size=75).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 10)
        with pytest.raises(RuntimeError):  # one pixel less and timm's own layers fail: the bound is tight
            model(torch.randn(1, 3, 74, 74))


def test_inception_v3_with_batch_normalized_auxiliary_classifier() -> None:
    model = create_model("timm_inception_v3", norm="bn", image_size=299, aux_logits=True, bn_aux=True)
    aux_fc = model.AuxLogits.fc
    assert isinstance(aux_fc[0], nn.Linear) and aux_fc[0].bias is None
    assert type(aux_fc[1]).__module__.startswith("bnzoo.norms") and aux_fc[1].num_features == 10
    norms = [m for m in model.modules() if is_norm(m)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(norms) == len(convs) + 1 and all(type(m).__module__.startswith("bnzoo.norms") for m in norms)

    x = torch.randn(2, 3, 299, 299)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 10)
    assert aux_fc[1].num_batches_tracked.item() == 1
    (F.cross_entropy(logits, labels(x)) + 0.4 * F.cross_entropy(aux, labels(x))).backward()
    assert all(p.grad is not None and p.grad.any() for p in model.AuxLogits.parameters())
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 10)  # eval: the logits only
    plain_aux = create_model("timm_inception_v3", image_size=299, aux_logits=True).AuxLogits.fc
    assert isinstance(plain_aux, nn.Linear)


def test_inception_v3_without_norm_has_sane_activations() -> None:
    model = create_model("timm_inception_v3", norm="none", image_size=75).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 75, 75))
    assert torch.isfinite(output).all() and 1e-3 < output.std().item() < 100.0


# ----------------------------------------------------------------------------------------------------------
# MLP (Ioffe & Szegedy 2015, Sec. 4.1)


def record_block(block: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for child in ("linear", "norm", "act"):
        getattr(block, child).register_forward_hook(
            lambda module, inputs, output, child=child: seen.__setitem__(child, (inputs[0], output))
        )
    return seen


def test_mlp_matches_the_paper_network() -> None:
    model = create_model("mlp", in_chans=1, image_size=28)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 100),
        (100, 100),
        (100, 100),
        (100, 10),
    ]
    assert all(isinstance(block.act, nn.Sigmoid) for block in model.blocks)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="784 features"):
        model(torch.randn(3, 3, 28, 28))


@pytest.mark.parametrize("position", ["before", "after"])
def test_mlp_norm_position(position: str) -> None:
    model = create_model("mlp", norm="bn", norm_position=position, in_chans=1, image_size=8).train()
    seen = record_block(model.blocks[-1])
    model(torch.randn(32, 1, 8, 8))
    linear_out = seen["linear"][1]
    if position == "before":  # linear -> norm -> act: the sigmoid sees standardized inputs
        assert torch.equal(seen["norm"][0], linear_out) and torch.equal(seen["act"][0], seen["norm"][1])
        sigmoid_input = seen["act"][0]
        torch.testing.assert_close(sigmoid_input.mean(0), torch.zeros(100), atol=1e-5, rtol=0)
        torch.testing.assert_close(sigmoid_input.var(0, unbiased=False), torch.ones(100), atol=1e-3, rtol=0)
        assert model.blocks[-1].linear.bias is None
    else:  # linear -> act -> norm
        assert torch.equal(seen["act"][0], linear_out) and torch.equal(seen["norm"][0], seen["act"][1])
        assert model.blocks[-1].linear.bias is not None


@pytest.mark.parametrize(("activation", "gain"), [("sigmoid", 1.0), ("relu", math.sqrt(2.0)), ("tanh", 5 / 3)])
@pytest.mark.parametrize("init_scale", [0.1, 3.0])
def test_mlp_init_scale(activation: str, gain: float, init_scale: float) -> None:
    model = create_model(
        "mlp", hidden=[400, 300], activation=activation, init_scale=init_scale, in_chans=1, image_size=20
    )
    for block, fan_in in zip(model.blocks, (400, 400), strict=True):
        expected = init_scale * gain / math.sqrt(fan_in)
        assert block.linear.weight.std().item() == pytest.approx(expected, rel=0.03)
        assert block.linear.weight.mean().abs().item() < 0.05 * expected
    assert model.head.weight.std().item() == pytest.approx(init_scale / math.sqrt(300), rel=0.05)
    assert not model.head.bias.any()


def test_mlp_dropout_and_relu() -> None:
    model = create_model("mlp", activation="relu", dropout=0.5, hidden=[64], in_chans=1, image_size=8)
    assert isinstance(model.blocks[0].act, nn.ReLU) and model.blocks[0].dropout.p == 0.5
    x = torch.randn(16, 1, 8, 8)
    assert not torch.equal(model.train()(x), model(x))  # dropout is active in training
    assert torch.equal(model.eval()(x), model(x))


# ----------------------------------------------------------------------------------------------------------
# Errors: at construction, naming the bad value and the valid choices


@pytest.mark.parametrize(
    ("name", "options", "fragments"),
    [
        ("mlp", {"activation": "swish"}, ["'swish'", "sigmoid", "relu", "tanh"]),
        ("bn_inception_small", {"activation": "gelu"}, ["'gelu'", "relu", "sigmoid"]),
        ("mlp", {"norm_position": "middle"}, ["'middle'", "before", "after"]),
        ("timm_inception_v3", {"image_size": 74}, ["75x75", "image_size=74"]),
        ("timm_inception_v3", {"image_size": 298, "aux_logits": True}, ["299x299", "aux_logits", "298"]),
        ("timm_inception_v3", {"bn_aux": True}, ["bn_aux", "aux_logits=True"]),
        ("timm_inception_v3", {"bn_aux": True, "aux_logits": True, "norm": "none"}, ["bn_aux", "'none'"]),
        ("resnet20", {"skip_init": "yes"}, ["skip_init", "'yes'"]),
        ("timm_resnet18", {"zero_init_residual": 1}, ["zero_init_residual", "1"]),
        ("resnet56", {"num_classes": 0}, ["num_classes", "0"]),
        ("bn_inception_small", {"width": 0}, ["width", "0"]),
        ("mlp", {"hidden": []}, ["hidden", "[]"]),
        ("mlp", {"hidden": [100, 0]}, ["hidden", "[100, 0]"]),
        ("mlp", {"dropout": 1.5}, ["dropout", "1.5"]),
        ("mlp", {"init_scale": -1.0}, ["init_scale", "-1.0"]),
        ("resnet20", {"norm": "bn", "norm_options": {"r_max": 2.0}}, ["r_max", "momentum"]),
    ],
)
def test_bad_options_fail_at_construction(name: str, options: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as error:
        create_model(name, **options)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_unknown_norm_kind_fails_with_the_valid_kinds(name: str) -> None:
    with pytest.raises(ValueError) as error:
        create_model(name, norm="batchnorm", image_size=IMAGE_SIZE.get(name, 32))
    assert "'batchnorm'" in str(error.value)
    assert all(kind in str(error.value) for kind in NORMS)
