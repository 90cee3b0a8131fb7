"""Transfer learning: our nets equal torchvision's (through the committed manifest), and the library around it."""

import functools
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
import torch

from model import pretrained
from model.manifests import make_manifest
from model.resnet import build

MANIFEST = json.loads(make_manifest.MANIFEST.read_text())
IMAGENET_ARCHS = sorted(MANIFEST["archs"])


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_build_state_dict_has_torchvision_keys_shapes_and_order(arch):
    expected = MANIFEST["archs"][arch]["keys"]
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in build(arch, num_classes=1000)
            .state_dict().items()]
    assert [k for k, *_ in ours] == [k for k, *_ in expected]
    assert ours == expected


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_build_with_manifest_weights_gives_torchvision_logits(arch):
    record = MANIFEST["archs"][arch]
    net = build(arch, num_classes=1000)
    state = make_manifest.state_from_numpy(record["keys"])
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(make_manifest.sample_input())).numpy()  # (2, 1000)
    expected = np.array(record["logits"])
    # the two random images must give logits that differ far beyond the tolerance, or the input would not matter
    assert np.abs(expected[0] - expected[1]).max() > 0.1
    np.testing.assert_allclose(logits[:, :: record["logits_every"]], expected, rtol=0, atol=1e-4)
    assert logits.argmax(1).tolist() == record["argmax"]


@pytest.mark.parametrize("arch", IMAGENET_ARCHS)
def test_imagenet_weights_pin_torchvision_urls_and_transform(arch):
    tv = MANIFEST["archs"][arch]["imagenet_weights"]
    url, sha256 = pretrained.IMAGENET_WEIGHTS[arch]
    assert url == tv["url"]
    assert url.endswith(f"-{sha256[:8]}.pth")  # torchvision names each file after its hash's first 8 digits
    pre, t = pretrained.IMAGENET_PREPROCESSING, tv["transforms"]
    assert (pre["input_size"], pre["resize_size"]) == (t["crop_size"] * 2, t["resize_size"][0])
    assert pre["crop_fraction"] == t["crop_size"][0] / t["resize_size"][0]
    assert (pre["mean"], pre["std"], pre["resize"]) == (t["mean"], t["std"], t["interpolation"])


# --- --init PATH ----------------------------------------------------------------------------------------------------


def source_state(arch: str = "resnet20", **kwargs) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict with recognisable values (the keys match torchvision's, tested above)."""
    torch.manual_seed(1)
    net = build(arch, num_classes=1000 if arch in IMAGENET_ARCHS else 10, **kwargs)
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.normal_()
    return net.state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: s, id="bare-state-dict"),
        pytest.param(lambda s: {"model": s, "epoch": 3, "labels": ["a", "b"]}, id="our-checkpoint"),
        pytest.param(lambda s: {"state_dict": s}, id="state_dict-checkpoint"),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="ddp-prefixed"),
    ],
)
def test_load_init_copies_backbone_and_keeps_new_head(tmp_path, wrap):
    state = source_state()
    torch.save(wrap(state), tmp_path / "w.pth")
    net = build("resnet20", num_classes=3)
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("fc.")}
    pretrained.load_init(net, tmp_path / "w.pth")
    loaded = net.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert loaded["fc.weight"].shape == (3, 64)
    assert all(torch.equal(loaded[k], v) for k, v in head_before.items())


def test_load_init_loads_torchvision_layout_into_resnet18_with_new_head(tmp_path):
    torch.save(source_state("resnet18"), tmp_path / "resnet18.pth")
    net = build("resnet18", num_classes=5)
    pretrained.load_init(net, tmp_path / "resnet18.pth")
    assert torch.equal(net.layer4[1].bn2.running_var, source_state("resnet18")["layer4.1.bn2.running_var"])
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("make_file", "net_kwargs", "message"),
    [
        pytest.param(lambda: without(source_state(), "layer3.2.bn2.weight"), {},
                     r"1 missing \(layer3.2.bn2.weight\)", id="missing-key"),
        pytest.param(lambda: {**source_state(), "layer4.0.conv1.weight": torch.zeros(1)}, {},
                     r"1 unexpected \(layer4.0.conv1.weight\)", id="unexpected-key"),
        pytest.param(lambda: source_state(), {"in_channels": 1},
                     r"1 of another shape \(conv1.weight \(16, 3, 3, 3\) in the file, \(16, 1, 3, 3\) in the net\)",
                     id="grey-net-rgb-weights"),
        pytest.param(lambda: source_state("resnet18"), {},
                     r"36 missing \(layer1.2.conv1.weight, .*; 42 unexpected \(layer2.0.downsample.0.weight, .*; "
                     r"65 of another shape \(conv1.weight \(64, 3, 7, 7\) in the file",
                     id="other-arch"),
        pytest.param(lambda: [torch.zeros(1)], {}, "holds neither a state dict", id="a-list"),
        pytest.param(lambda: {"epoch": 3}, {}, "holds neither a state dict", id="checkpoint-without-weights"),
        pytest.param(lambda: b"not a torch file", {}, "is not a torch weights file", id="garbage"),
        pytest.param(None, {}, "no weights file at", id="no-file"),
    ],
)
def test_load_init_mismatch_fails_naming_first_keys(tmp_path, make_file, net_kwargs, message):
    path = tmp_path / "w.pth"
    if make_file is not None:
        obj = make_file()
        path.write_bytes(obj) if isinstance(obj, bytes) else torch.save(obj, path)
    net = build("resnet20", num_classes=3, **net_kwargs)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(pretrained.WeightsError, match=message):
        pretrained.load_init(net, path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # nothing half-copied


# --- --pretrained imagenet ------------------------------------------------------------------------------------------


@pytest.fixture
def weights_server(tmp_path):
    """A local HTTP server for tmp_path/serve, counting the GET requests it answers."""
    folder = tmp_path / "serve"
    folder.mkdir()
    gets = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}", gets
    finally:
        server.shutdown()
        server.server_close()


def fake_weights(folder) -> tuple[str, bytes]:
    torch.save(source_state(), folder / "resnet20-fake.pth")
    return "resnet20-fake.pth", (folder / "resnet20-fake.pth").read_bytes()


@pytest.mark.parametrize("digits", [pytest.param(64, id="full-sha256"), pytest.param(8, id="torchvision-prefix")])
def test_fetch_downloads_checks_and_caches(tmp_path, weights_server, digits):
    folder, base, gets = weights_server
    name, body = fake_weights(folder)
    sha256 = hashlib.sha256(body).hexdigest()[:digits]
    path = pretrained.fetch("resnet20", f"{base}/{name}", sha256, tmp_path / "cache")
    assert path == tmp_path / "cache" / name and path.read_bytes() == body
    assert pretrained.fetch("resnet20", f"{base}/{name}", sha256, tmp_path / "cache") == path
    assert gets == [f"/{name}"]  # the second call used the cache
    net = build("resnet20", num_classes=2)
    pretrained.load_init(net, path)
    assert torch.equal(net.conv1.weight, source_state()["conv1.weight"])


def test_fetch_wrong_hash_is_refused_and_removed(tmp_path, weights_server):
    folder, base, _ = weights_server
    name, body = fake_weights(folder)
    digest = hashlib.sha256(body).hexdigest()
    with pytest.raises(pretrained.WeightsError, match=f"has sha256 {digest}, expected 0{{8}}.*removed"):
        pretrained.fetch("resnet20", f"{base}/{name}", "0" * 8, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_replaces_a_damaged_cache_entry(tmp_path, weights_server):
    folder, base, gets = weights_server
    name, body = fake_weights(folder)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / name).write_bytes(body[:100])  # an interrupted copy
    path = pretrained.fetch("resnet20", f"{base}/{name}", hashlib.sha256(body).hexdigest(), tmp_path / "cache")
    assert path.read_bytes() == body and gets == [f"/{name}"]


@pytest.mark.parametrize(
    ("arch", "url", "sha256", "message"),
    [
        pytest.param("resnet20", None, None, "no ImageNet weights for 'resnet20'", id="no-pinned-weights"),
        pytest.param("resnet18", "http://127.0.0.1:1/x.pth", "f3707", "at least 8 hex digits", id="short-hash"),
        pytest.param("resnet18", "http://127.0.0.1:1/x.pth", "not-hex!", "at least 8 hex digits", id="not-hex"),
        pytest.param("resnet18", "http://127.0.0.1:1/x.pth", "f37072fd", "could not download", id="unreachable"),
    ],
)
def test_fetch_bad_request_fails_clearly(tmp_path, arch, url, sha256, message):
    with pytest.raises(pretrained.WeightsError, match=message):
        pretrained.fetch(arch, url, sha256, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


# --- fine-tuning and linear probes ----------------------------------------------------------------------------------


def test_backbone_and_head_params_split_every_parameter_once():
    net = build("resnet20", num_classes=4)
    backbone, head = pretrained.backbone_and_head_params(net)
    assert [id(p) for p in head] == [id(net.fc.weight), id(net.fc.bias)]
    assert {id(p) for p in backbone} == {id(p) for n, p in net.named_parameters() if not n.startswith("fc.")}
    assert len(backbone) + len(head) == len(list(net.parameters()))


def test_param_groups_scale_only_the_backbone_lr():
    net = build("resnet20", num_classes=4)
    groups = pretrained.param_groups(net, 0.1)
    assert [(g["lr_scale"], len(g["params"])) for g in groups] == [(0.1, len(list(net.parameters())) - 2), (1.0, 2)]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [0.1, 1.0]  # the loop multiplies by it each step
    with pytest.raises(ValueError, match="must be positive"):
        pretrained.param_groups(net, 0.0)


def test_freeze_backbone_trains_only_the_head_and_keeps_bn_statistics():
    torch.manual_seed(0)
    net = pretrained.freeze_backbone(build("resnet20", num_classes=4))
    backbone_before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    head_before = net.fc.weight.detach().clone()
    net.train()
    assert not net.bn1.training and not net.layer3[2].bn2.training and net.fc.training
    optimizer = torch.optim.SGD(pretrained.param_groups(net, 1.0), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 8, 8) * 3 + 1), torch.randint(0, 4, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    after = net.state_dict()
    changed = [k for k, v in backbone_before.items() if not torch.equal(after[k], v)]
    assert changed == []  # running statistics and num_batches_tracked included
    assert not torch.equal(net.fc.weight, head_before)


def test_freeze_backbone_keeps_state_dict_keys_and_eval_output():
    net = build("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    keys, expected = list(net.state_dict()), net(x)
    pretrained.freeze_backbone(net)
    assert list(net.state_dict()) == keys  # a probe's checkpoint loads into a plain build() and exports as before
    assert torch.equal(net.train()(x), expected)  # train mode: the frozen backbone still uses running statistics
