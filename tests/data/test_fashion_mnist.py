"""Fashion-MNIST from the files a user has: IDX files written here (gzipped and not, in both layouts), and the real ones where installed."""
import gzip
import pathlib

import pytest
import torch

from conftest import FASHION_MNIST_FILES, fashion_mnist_arrays, idx_bytes, write_idx_files
from timm_exits.data import DEBIAN_FASHION_MNIST, fashion_mnist, read_idx

NAMES = FASHION_MNIST_FILES


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_files_image_for_image_in_either_layout(tmp_path, layout, gz):
    arrays = fashion_mnist_arrays()
    write_idx_files(tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path, arrays, gz)
    task = fashion_mnist(tmp_path, val_size=50, labels_per_class=2)
    raw_train, raw_test = arrays[NAMES[0]].float() / 255, arrays[NAMES[2]].float() / 255
    mean, std = raw_train[task.train.index].mean(), raw_train[task.train.index].std()
    for split, raw, labels in ((task.train, raw_train, arrays[NAMES[1]]), (task.val, raw_train, arrays[NAMES[1]]),
                               (task.test, raw_test, arrays[NAMES[3]])):
        assert split.x.shape[1:] == (1, 28, 28)
        assert torch.allclose(split.x[:, 0], (raw[split.index] - mean) / std, atol=1e-5)  # each image is its file's, standardized
        assert torch.equal(split.y, labels[split.index])
    assert (len(task.train), len(task.val), len(task.test)) == (250, 50, 100)
    assert task.num_classes == 10 and task.classes[9] == "Ankle boot"


def test_validation_comes_from_training_images_by_class_and_the_seed_fixes_everything(tmp_path):
    write_idx_files(tmp_path, fashion_mnist_arrays(), gz=True)
    task = fashion_mnist(tmp_path, val_size=50, train_size=100, test_size=40, labels_per_class=3, seed=1)
    assert not set(task.train.index.tolist()) & set(task.val.index.tolist())
    assert task.val.y.bincount(minlength=10).tolist() == [5] * 10
    assert task.train.y.bincount(minlength=10).tolist() == [10] * 10 and task.test.y.bincount(minlength=10).tolist() == [4] * 10
    assert task.labeled.sum() == 30 and task.train.y[task.labeled].bincount(minlength=10).tolist() == [3] * 10
    limited = task.limited()
    assert torch.equal(limited.y[~task.labeled], torch.full(((~task.labeled).sum(),), -100)) and len(task.limited(False)) == 30
    again, other = fashion_mnist(tmp_path, val_size=50, train_size=100, test_size=40, labels_per_class=3, seed=1), \
        fashion_mnist(tmp_path, val_size=50, train_size=100, test_size=40, labels_per_class=3, seed=2)
    assert all(torch.equal(getattr(task, s).x, getattr(again, s).x) for s in ("train", "val", "test"))
    assert not torch.equal(task.val.index, other.val.index)


def test_resizing_keeps_the_range_and_the_labels(tmp_path):
    write_idx_files(tmp_path, fashion_mnist_arrays(), gz=False)
    task = fashion_mnist(tmp_path, val_size=50, size=32, labels_per_class=2)
    assert task.train.x.shape[1:] == (1, 32, 32) and abs(float(task.train.x.mean())) < 1e-4


def test_missing_files_say_where_it_looked_and_how_to_get_them(tmp_path):
    arrays = fashion_mnist_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    write_idx_files(tmp_path, arrays, gz=True)
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist(tmp_path)
    message = str(err.value)
    assert "t10k-labels-idx1-ubyte" in message and "t10k-images" not in message.split(" not found")[0]
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message and "FashionMNIST(ROOT, download=True)" in message


def test_a_damaged_file_is_named(tmp_path):
    arrays = fashion_mnist_arrays()
    write_idx_files(tmp_path, arrays, gz=False)
    images = tmp_path / NAMES[0]
    images.write_bytes(images.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: the header says shape \(300, 28, 28\)"):
        fashion_mnist(tmp_path, val_size=50)
    images.write_bytes(b"<html>Not found</html>")  # what a failed download leaves
    with pytest.raises(ValueError, match=r"is not an IDX file of unsigned bytes.*3c 68 74 6d"):
        fashion_mnist(tmp_path, val_size=50)
    (tmp_path / NAMES[0]).unlink()
    (tmp_path / (NAMES[0] + ".gz")).write_bytes(gzip.compress(idx_bytes(arrays[NAMES[0]]))[:100])
    with pytest.raises(ValueError, match="could not be read as gzip"):
        fashion_mnist(tmp_path, val_size=50)


def test_images_and_labels_that_disagree_are_refused(tmp_path):
    arrays = fashion_mnist_arrays()
    arrays[NAMES[1]] = arrays[NAMES[1]][:-1]
    write_idx_files(tmp_path, arrays, gz=False)
    with pytest.raises(ValueError, match=r"holds \(300, 28, 28\) and .* \(299,\)"):
        fashion_mnist(tmp_path, val_size=50)
    arrays = fashion_mnist_arrays()
    arrays[NAMES[3]][0] = 12
    write_idx_files(tmp_path, arrays, gz=False)
    with pytest.raises(ValueError, match="holds label 12; the 10 classes are 0-9"):
        fashion_mnist(tmp_path, val_size=50)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_size": 300}, "val_size must be below the 300 training images"),
    ({"val_size": 50, "train_size": 251}, r"train_size must be at most 250 \(the training images left after val_size=50\)"),
    ({"val_size": 50, "test_size": 101}, "test_size must be at most 100"),
    ({"val_size": 5.0}, "val_size must be an int >= 10"),
    ({"val_size": 50, "labels_per_class": 40}, r"labels_per_class must be at most 25 \(the training images of class 0\)"),
    ({"size": True}, "size must be an int >= 8, got True"),
])
def test_bad_arguments_name_the_argument_and_what_is_valid(tmp_path, kwargs, message):
    write_idx_files(tmp_path, fashion_mnist_arrays(), gz=False)
    with pytest.raises(ValueError, match=message):
        fashion_mnist(tmp_path, **kwargs)


def test_read_idx_returns_the_array_it_was_given(tmp_path):
    array = torch.randint(0, 256, (3, 4, 5))
    (tmp_path / "a").write_bytes(idx_bytes(array))
    assert torch.equal(read_idx(tmp_path / "a"), array.to(torch.uint8))


@pytest.mark.skipif(not pathlib.Path(DEBIAN_FASHION_MNIST).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_files_from_debians_package():
    task = fashion_mnist(val_size=5000, train_size=1000, test_size=1000)
    assert (len(task.train), len(task.val), len(task.test)) == (1000, 5000, 1000)
    for name, total in (("train", 60000), ("t10k", 10000)):
        labels = read_idx(pathlib.Path(DEBIAN_FASHION_MNIST) / f"{name}-labels-idx1-ubyte.gz")
        assert labels.bincount().tolist() == [total // 10] * 10  # the dataset's published class balance
    assert read_idx(pathlib.Path(DEBIAN_FASHION_MNIST) / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
