"""Our resnet18/34/50 equal torchvision's, held to the committed manifest torchvision itself wrote."""

import json

import numpy as np
import pytest
import torch

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
