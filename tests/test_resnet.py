"""The architecture pins the paper's claims: parameter counts, shapes, and the easy identity."""

import pytest
import torch

from model.resnet import BasicBlock, Bottleneck, build, cifar_resnet


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        # He et al. 2015, Table 6 (CIFAR-10, option A) and Table 1 / torchvision (ImageNet, option B).
        pytest.param("resnet20", {}, 269_722, id="resnet20-0.27M"),
        pytest.param("resnet56", {}, 853_018, id="resnet56-0.85M"),
        pytest.param("resnet110", {}, 1_727_962, id="resnet110-1.7M"),
        pytest.param("resnet18", {"num_classes": 1000}, 11_689_512, id="resnet18-11.7M"),
        pytest.param("resnet50", {"num_classes": 1000}, 25_557_032, id="resnet50-25.6M"),
    ],
)
def test_build_param_count_matches_paper(arch, kwargs, expected):
    assert n_params(build(arch, **kwargs)) == expected


def test_build_plain_has_same_params_as_option_a_residual():
    # Option A shortcuts are parameter-free, so the plain twin has exactly the same weights.
    assert n_params(build("resnet20", residual=False)) == n_params(build("resnet20"))


def zeroed(block: torch.nn.Module) -> torch.nn.Module:
    for m in block.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            torch.nn.init.zeros_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    return block


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_residual_block_with_zero_weights_is_identity_on_nonnegative_input(block_type, mode):
    planes = 8
    block = zeroed(block_type(planes * block_type.expansion, planes, residual=True))
    block.train(mode == "train")
    a = torch.relu(torch.randn(4, planes * block_type.expansion, 6, 6))  # a ReLU's output: non-negative
    assert torch.equal(block(a), a)


@pytest.mark.parametrize("block_type", [BasicBlock, Bottleneck])
def test_plain_block_with_zero_weights_is_not_identity(block_type):
    planes = 8
    block = zeroed(block_type(planes * block_type.expansion, planes, residual=False)).eval()
    a = torch.relu(torch.randn(4, planes * block_type.expansion, 6, 6)) + 0.1
    out = block(a)
    assert torch.count_nonzero(out) == 0  # it collapses to zero instead of passing a[l] through
    assert not torch.allclose(out, a)


def test_zero_init_residual_makes_every_block_start_as_identity():
    net = build("resnet20", zero_init_residual=True).eval()
    for block in net.blocks():
        assert torch.count_nonzero(block.last_bn().weight) == 0
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 8, 8))
        assert torch.count_nonzero(block.branch(x)) == 0


@pytest.mark.parametrize(
    ("block_type", "in_planes", "planes", "stride", "shortcut", "out_shape"),
    [
        pytest.param(BasicBlock, 16, 16, 1, "A", (2, 16, 8, 8), id="basic-same-shape"),
        pytest.param(BasicBlock, 16, 32, 2, "A", (2, 32, 4, 4), id="basic-option-A"),
        pytest.param(BasicBlock, 16, 32, 2, "B", (2, 32, 4, 4), id="basic-option-B"),
        pytest.param(Bottleneck, 64, 16, 1, "B", (2, 64, 8, 8), id="bottleneck-same-shape"),
        pytest.param(Bottleneck, 64, 32, 2, "B", (2, 128, 4, 4), id="bottleneck-option-B"),
        pytest.param(Bottleneck, 64, 32, 2, "A", (2, 128, 4, 4), id="bottleneck-option-A"),
    ],
)
def test_block_output_shape_through_each_shortcut(block_type, in_planes, planes, stride, shortcut, out_shape):
    block = block_type(in_planes, planes, stride, shortcut)
    assert block(torch.randn(2, in_planes, 8, 8)).shape == out_shape


def test_option_a_shortcut_has_no_parameters_and_option_b_learns_one():
    a = BasicBlock(16, 32, 2, "A")
    b = BasicBlock(16, 32, 2, "B")
    assert n_params(a.downsample) == 0
    assert n_params(b.downsample) == 16 * 32 + 2 * 32  # 1x1 conv + BN scale and shift


@pytest.mark.parametrize(
    ("arch", "channels", "size"),
    [("resnet20", 1, 32), ("resnet20", 3, 8), ("resnet18", 3, 64), ("resnet50", 3, 64)],
)
def test_forward_gives_logits_per_class(arch, channels, size):
    net = build(arch, num_classes=7, in_channels=channels).eval()
    assert net(torch.randn(3, channels, size, size)).shape == (3, 7)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: cifar_resnet(21), r"6n\+2", id="bad-depth"),
        pytest.param(lambda: build("resnet20", shortcut="C"), "shortcut must be one of", id="bad-shortcut"),
        pytest.param(lambda: build("vgg16"), "unknown arch", id="unknown-arch"),
        pytest.param(lambda: build("resnet20", num_classes=0), "must be positive", id="no-classes"),
    ],
)
def test_build_invalid_config_fails_with_exact_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("shortcut", "downsample_keys"),
    [
        pytest.param("A", [], id="option-A-parameter-free"),
        pytest.param("B", ["layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight"], id="option-B-projection"),
    ],
)
def test_cifar_state_dict_uses_torchvision_names(shortcut, downsample_keys):
    keys = list(build("resnet20", shortcut=shortcut).state_dict())
    assert sorted({k.split(".")[0] for k in keys}) == ["bn1", "conv1", "fc", "layer1", "layer2", "layer3"]
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "layer3.2.bn2.running_var" in keys
    assert [k for k in keys if "downsample" in k and k.endswith(".weight")] == downsample_keys + [
        k.replace("layer2", "layer3") for k in downsample_keys
    ]
