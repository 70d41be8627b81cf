import re

import pytest
import timm
import torch
import torchvision
from torch import nn

tv = torchvision.models

# The matrix of the issue: small inputs, few classes. Each entry builds a fresh backbone.
FAMILIES = {
    "timm/resnet18": lambda: timm.create_model("resnet18", num_classes=5),
    "timm/resnet50": lambda: timm.create_model("resnet50", num_classes=5),
    "timm/resnext26ts": lambda: timm.create_model("resnext26ts", num_classes=5),
    "timm/wide_resnet50_2": lambda: timm.create_model("wide_resnet50_2", num_classes=5),
    "timm/vgg11": lambda: timm.create_model("vgg11", num_classes=5),
    "timm/mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=5),
    "timm/efficientnet_b0": lambda: timm.create_model("efficientnet_b0", num_classes=5),
    "timm/convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=5),
    "timm/regnetx_002": lambda: timm.create_model("regnetx_002", num_classes=5),
    "timm/densenet121": lambda: timm.create_model("densenet121", num_classes=5),
    "timm/vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32),
    "timm/deit_tiny_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32),
    "timm/swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, img_size=32, window_size=2),
    "torchvision/resnet18": lambda: tv.resnet18(num_classes=5),
    "torchvision/mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=5),
    "torchvision/efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=5),
    "torchvision/convnext_tiny": lambda: tv.convnext_tiny(num_classes=5),
    "torchvision/densenet121": lambda: tv.densenet121(num_classes=5),
    "torchvision/vit_b_16": lambda: tv.vit_b_16(num_classes=5, image_size=32),
    "torchvision/swin_t": lambda: tv.swin_t(num_classes=5),
}


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5)


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message, word for word."""
    return "^" + re.escape(message) + "$"


def resnet10t_exits(images: int, cascade=False):
    """A resnet10t with exits after layer1 and layer2 at 3x32x32 (5 classes, eval mode) and `images` fixed random images."""
    import timm_exits

    torch.manual_seed(0)
    model = timm_exits.wrap(timm.create_model("resnet10t", num_classes=5), stages=[1, 2], input_size=(3, 32, 32), cascade=cascade).eval()
    return model, torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: torch.Tensor) -> bytes:
    """MNIST's IDX format: 00 00 08 (unsigned bytes), the dimension count, each dimension as a big-endian int32, the data."""
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def fashion_mnist_arrays(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict:
    """Fashion-MNIST's four arrays by file name, random pixels, the classes in turn (every class equally often)."""
    g = torch.Generator().manual_seed(seed)
    return dict(zip(FASHION_MNIST_FILES, (torch.randint(0, 256, (n_train, 28, 28), generator=g), torch.arange(n_train) % 10,
                                          torch.randint(0, 256, (n_test, 28, 28), generator=g), torch.arange(n_test) % 10)))


def write_idx_files(folder, arrays: dict, gz: bool = True) -> None:
    """Each array as the IDX file of its name in `folder` (gzipped as ``NAME.gz``, as distributed, or plain)."""
    import gzip
    import pathlib

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        (folder / (name + ".gz")).write_bytes(gzip.compress(data)) if gz else (folder / name).write_bytes(data)


class DataDependent(nn.Module):
    """fx cannot trace control flow on tensor values."""

    def forward(self, x):
        return x.relu() if x.mean() > 0 else x


def fallback_resnet(head="linear"):
    """A resnet18 that fx cannot trace (a DataDependent in layer2): wrap() falls back to forward_intermediates, saying so."""
    import timm_exits

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=5)
    backbone.layer2[0].act1 = DataDependent()
    with pytest.warns(UserWarning, match="forward_intermediates"):
        return timm_exits.wrap(backbone, stages=[1, 2], head=head, input_size=(3, 32, 32))


def overconfident(n=2000, classes=5, sharpness=(3.0, 1.0, 0.5), seed=0):
    """Cached exits: the labels are drawn from softmax(`truth`) and the last exit's logits are `truth` x 2
    (so its true temperature is 2); the earlier exits are noisier and sharpened by `sharpness[k]`."""
    import timm_exits

    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, classes, generator=g) * 2
    labels = torch.multinomial(truth.softmax(-1), 1, generator=g).squeeze(1)
    logits = [(truth + torch.randn(n, classes, generator=g) * (len(sharpness) - 1 - k)) * s for k, s in enumerate(sharpness[:-1])]
    logits.append(truth * 2)
    return timm_exits.CachedExits(torch.stack(logits), labels, [1.0, 2.0, 3.0][: len(sharpness)], [f"s{k}" for k in range(len(sharpness))])


@pytest.fixture(autouse=True)
def head_registry_restored():
    """A test (or a docs example) that registers a head leaves the registry as it found it, whatever runs after it."""
    from timm_exits.heads import registry

    saved = dict(registry._HEADS)
    yield
    registry._HEADS.clear()
    registry._HEADS.update(saved)
