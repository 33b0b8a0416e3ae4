"""DataModules on data the tests write themselves (and the real Fashion-MNIST when installed)."""

from __future__ import annotations

import gzip
import importlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from lit_helpers import write_fake_fashion, write_idx
from PIL import Image

from qat.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    read_idx,
)
from qat.data import fashion_mnist as fm
from qat.data.imagefolder import unreadable_images
from qat.data.transforms import (
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    pad_to,
    resize_center_crop,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread. On this 2-core box, 2 OpenMP threads that spin while
    another process holds a core made a ResNet step 100x slower (2.4 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# transforms


def test_transforms() -> None:
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    assert RandomCrop(4, padding=0)(x).equal(x)
    crops = {tuple(RandomCrop(4, padding=2)(x).flatten().tolist()) for _ in range(50)}
    assert len(crops) > 1 and all(len(c) == 32 for c in crops)
    assert RandomHorizontalFlip(p=1.0)(x).equal(x.flip(-1))
    assert RandomHorizontalFlip(p=0.0)(x).equal(x)
    y = Normalize((1.0, 2.0), (2.0, 4.0))(x)
    assert torch.allclose(y[1], (x[1] - 2) / 4)
    padded = pad_to(torch.ones(1, 28, 28), 32)
    assert padded.shape == (1, 32, 32) and padded.sum() == 28 * 28
    assert padded[0, 2:30, 2:30].all() and not padded[0, :2].any() and not padded[0, :, 30:].any()
    with pytest.raises(ValueError, match="std"):
        Normalize((0.0,), (0.0,))


def test_resize_center_crop_keeps_aspect() -> None:
    img = Image.new("RGB", (20, 10))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # red left quarter: cropped away by the center crop
    out = resize_center_crop(img, 8)
    assert out.size == (8, 8)
    assert np.asarray(out)[..., 0].max() < 128


# ---------------------------------------------------------------------------------------------
# digits (embedded in scikit-learn)


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_digits_shapes_and_splits(image_size: int) -> None:
    dm = DigitsDataModule(batch_size=32, image_size=image_size)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert n_test == round(1797 * 0.2) and n_val == round((1797 - n_test) * 0.1)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, image_size)
    raw = dm.train_set.images
    assert raw.shape[1:] == (1, image_size, image_size)
    assert raw.min() >= 0 and raw.max() <= 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, image_size, image_size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    # Normalized with the dataset statistics.
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_digits_split_is_deterministic_and_disjoint() -> None:
    a, b, c = (DigitsDataModule(seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert a.train_set.images.equal(b.train_set.images)
    assert a.val_set.labels.equal(b.val_set.labels)
    assert a.test_set.images.equal(b.test_set.images)
    assert not a.test_set.images.equal(c.test_set.images)
    # Disjoint: every sample lands in exactly one split (compare sample sets by content).
    x, _, test_mask = a._load_all()
    assert int(test_mask.sum()) == len(a.test_set)
    train_idx, val_idx = a.split_indices(int((~test_mask).sum()))
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert len(train_idx) + len(val_idx) == len(x) - len(a.test_set)


def test_digits_loaders() -> None:
    dm = DigitsDataModule(batch_size=100, augment=True, crop_padding=2)
    dm.setup()
    train = dm.train_dataloader()
    assert all(len(y) == 100 for _, y in train)  # drop_last on the training split only
    val = dm.val_dataloader()
    first, second = next(iter(val)), next(iter(val))
    assert first[0].equal(second[0])  # val: no shuffle, no augmentation
    assert sum(len(y) for _, y in dm.test_dataloader()) == len(dm.test_set)
    # Augmentation only on the training split.
    assert not dm.train_set[0][0].equal(dm.train_set[0][0]) or not dm.train_set[1][0].equal(
        dm.train_set[1][0]
    )
    assert dm.val_set[0][0].equal(dm.val_set[0][0])


def test_digits_with_worker_process() -> None:
    dm = DigitsDataModule(batch_size=256, num_workers=1)
    loader = dm.train_dataloader()  # sets itself up outside a Trainer
    assert loader.persistent_workers and not loader.pin_memory
    assert sum(len(y) for _, y in loader) == len(dm.train_set) // 256 * 256
    # Stop the persistent worker now: reaped later by the garbage collector (in another test),
    # its shutdown waited out DataLoader's 5 s join timeout.
    del loader


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"image_size": 1}, "image_size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"resize_mode": "bicubic"}, "resize_mode"),
    ],
)
def test_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        DigitsDataModule(**kwargs)


@pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_lightning_fit_and_test_on_digits() -> None:
    import lightning.pytorch as pl
    from torch import nn

    from qat.models import create_model

    class Classifier(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.model(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_acc", (self.model(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=64)
    model = create_model(
        "resnet20",
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        image_size=dm.image_size,
        base_width=4,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        limit_test_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(model), datamodule=dm)
    (result,) = trainer.test(datamodule=dm, ckpt_path=None, model=trainer.lightning_module)
    assert 0 <= result["test_acc"] <= 1
    assert dm.hparams["batch_size"] == 64 and dm.hparams["image_size"] == 8


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.fixture
def no_system_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No Debian package, and every download fails (as offline); returns the URLs tried."""
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian-package")
    tried: list[str] = []

    def offline(url: str, dest: Path, timeout: float) -> None:
        tried.append(url)
        raise OSError("offline (test)")

    monkeypatch.setattr(fm, "_fetch", offline)
    return tried


@pytest.mark.parametrize("dtype", ["uint8", ">i4", ">f4"])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, dtype: str, gz: bool) -> None:
    array = (np.arange(2 * 3 * 5) % 200).astype(dtype).reshape(2, 3, 5)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and np.array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "html").write_bytes(b"<html>captive portal</html>")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "html")
    write_idx(tmp_path / "ok", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("image_size", [28, 32])
def test_fashion_mnist_from_data_dir(
    tmp_path: Path, no_system_fashion: list[str], gz: bool, image_size: int
) -> None:
    write_fake_fashion(tmp_path, gz=gz)
    dm = FashionMNISTDataModule(
        tmp_path, batch_size=8, val_fraction=0.25, image_size=image_size, augment=False
    )
    assert dm.check()["train_images"].parent == tmp_path
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 12)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, image_size)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, image_size, image_size)
    # Sample i has pixel value i and label i % 10: images and labels stay paired.
    pixel = x[:, 0, image_size // 2, image_size // 2] * dm.std[0] + dm.mean[0]
    assert torch.allclose(pixel * 255, torch.arange(8.0), atol=1e-3)
    assert y.tolist() == [i % 10 for i in range(8)]
    if image_size == 32:  # padded 2 px each side with black
        assert torch.allclose(x[:, :, :2], torch.tensor(-dm.mean[0] / dm.std[0]))
    assert no_system_fashion == []  # found locally: no download attempted


def test_fashion_mnist_mixed_gz_and_plain_and_torchvision_layout(
    tmp_path: Path, no_system_fashion: list[str]
) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    write_fake_fashion(raw, gz=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        gz_path = raw / f"{name}.gz"
        (raw / name).write_bytes(gzip.decompress(gz_path.read_bytes()))
        gz_path.unlink()
    files = FashionMNISTDataModule(tmp_path).check()
    assert files["train_images"].name.endswith(".gz") and files["test_images"].suffix == ""


def test_fashion_mnist_missing_names_all_three_ways(
    tmp_path: Path, no_system_fashion: list[str]
) -> None:
    dm = FashionMNISTDataModule(tmp_path / "data")  # constructing is free: no lookup yet
    with pytest.raises(FileNotFoundError) as info:
        dm.check()
    message = str(info.value)
    assert str(tmp_path / "data") in message  # (1) put the files in data_dir
    assert "apt-get install dataset-fashion-mnist" in message  # (2) the Debian package
    assert "download" in message and "offline (test)" in message  # (3) the download
    assert "train-images-idx3-ubyte" in message
    assert len(no_system_fashion) == len(fm.MIRRORS)  # gave up after the first file
    with pytest.raises(FileNotFoundError, match="download=False"):
        FashionMNISTDataModule(tmp_path / "data", download=False).check()
    assert len(no_system_fashion) == len(fm.MIRRORS)
    with pytest.raises(FileNotFoundError):  # Lightning's prepare_data fails the same way
        dm.prepare_data()


def test_fashion_mnist_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A file:// "mirror" exercises the real download code (urllib, validation, rename).
    mirror = tmp_path / "mirror"
    write_fake_fashion(mirror, gz=True)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.setattr(
        fm, "MIRRORS", ((tmp_path / "broken").as_uri() + "/", mirror.as_uri() + "/")
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # One file already there: only the others are fetched.
    (data_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(
        (mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()
    )
    dm = FashionMNISTDataModule(data_dir, batch_size=4)
    dm.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        f"{n}.gz" for n in fm.FILES.values()
    )  # the broken mirror's HTML page was rejected, no *.part left behind
    dm.setup("test")
    assert len(dm.test_set) == 12


def test_env_var_moves_the_debian_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # .ci/run points it at a missing folder to run the tests as on a machine without the
    # package; here at tiny files, which are then found without data_dir or a download. It is
    # read at import: reload the module with it set, then put the original objects back (the
    # classes other modules imported stay the module's own).
    write_fake_fashion(tmp_path / "system", gz=False)
    monkeypatch.setenv("QAT_FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "system"))
    original = dict(vars(fm))
    try:
        importlib.reload(fm)
        assert tmp_path / "system" == fm.DEBIAN_DIR
        files = fm.find_fashion_mnist(tmp_path / "empty", download=False)
        assert files["test_labels"] == tmp_path / "system" / "t10k-labels-idx1-ubyte"
    finally:
        vars(fm).clear()
        vars(fm).update(original)
    assert fm.FashionMNISTDataModule is FashionMNISTDataModule
    assert Path("/usr/share/datasets/fashion-mnist") == fm.PACKAGE_DIR


REAL = fm.DEBIAN_DIR


@pytest.mark.skipif(
    bool(fm._find_in(REAL)[1]),
    reason=f"real Fashion-MNIST not in {REAL} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(tmp_path, batch_size=256, image_size=32, download=False)
    assert dm.check()["train_images"].parent == REAL
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    assert torch.bincount(dm.test_set.labels).tolist() == [1000] * 10
    images = dm.test_set.images
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8
    mean = float(images[..., 2:30, 2:30].float().mean()) / 255
    assert abs(mean - dm.mean[0]) < 0.01  # the normalization constants fit the data
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 32, 32) and y.shape == (256,)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def write_fake_cifar(root: Path, n: int = 10) -> Path:
    """Pickle batches as the python version has them; image i of batch b has red = 10 * b + i."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((n, 3, 32, 32), np.uint8)
        data[:, 0] = (10 * b + np.arange(n))[:, None, None]  # red plane
        data[:, 2, 0, 0] = 255  # blue top-left pixel: checks the channel-major layout
        batch = {
            b"batch_label": name.encode(),
            b"labels": [(b + i) % 10 for i in range(n)],
            b"data": data.reshape(n, 3072),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_from_pickles(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(tmp_path, batch_size=5, val_fraction=0.2, augment=True)
    assert dm.check() == tmp_path / "cifar-10-batches-py"
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    images = dm.test_set.images
    assert images.shape == (10, 3, 32, 32)
    assert images[:, 0, 5, 5].tolist() == [50 + i for i in range(10)]
    assert (images[:, 2, 0, 0] == 255).all() and (images[:, 2, 0, 1] == 0).all()
    assert dm.test_set.labels.tolist() == [(5 + i) % 10 for i in range(10)]
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32)
    # The test split is not augmented: exactly the normalized image.
    x0, _ = dm.test_set[0]
    expected = (images[0].float() / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(
        dm.std
    ).view(3, 1, 1)
    assert torch.allclose(x0, expected)


def test_cifar10_val_fraction_zero_validates_on_test(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(tmp_path / "cifar-10-batches-py", val_fraction=0.0)  # folder itself
    dm.setup("fit")
    assert len(dm.train_set) == 50 and dm.val_set is dm.test_set and len(dm.val_set) == 10


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*cifar-10-python\.tar\.gz"):
        CIFAR10DataModule(tmp_path).check()


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    dm = CIFAR10DataModule(tmp_path)
    with pytest.raises(ValueError, match=r"builtins\.print"):
        dm.setup("test")


# ---------------------------------------------------------------------------------------------
# ImageFolder


def write_pngs(root: Path, classes: dict[str, int], size: tuple[int, int] = (12, 9)) -> None:
    """``count`` tiny PNGs per class; class k's images are filled with gray level 40 * k."""
    for k, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (40 * k, 40 * k, 40 * k)).save(root / name / f"{i}.png")


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    write_pngs(tmp_path / "train", {"cat": 4, "dog": 3, "emu": 5})
    write_pngs(tmp_path / "val", {"cat": 2, "dog": 2})  # a class may be absent from val
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(tmp_path, batch_size=4, image_size=8, augment=True)
    assert dm.classes == ("cat", "dog", "emu") and dm.num_classes == 3
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (12, 4)
    assert dm.test_set is dm.val_set  # no test/ folder: test on val
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8)
    xv, yv = dm.val_set[2]
    assert int(yv) == 1  # dog
    gray = torch.full((3, 8, 8), 40 / 255)
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    assert torch.allclose(xv, (gray - mean) / std, atol=1e-5)


def test_imagefolder_single_root_grayscale(tmp_path: Path) -> None:
    write_pngs(tmp_path, {"a": 10, "b": 10}, size=(30, 16))
    dm = ImageFolderDataModule(tmp_path, batch_size=3, image_size=16, in_channels=1, seed=3)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (18, 2)
    assert dm.test_set is dm.val_set
    train_paths = {p for p, _ in dm.train_set.samples}
    assert train_paths.isdisjoint(p for p, _ in dm.val_set.samples)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 1, 16, 16) and dm.in_channels == 1 and len(dm.mean) == 1
    again = ImageFolderDataModule(tmp_path, image_size=16, seed=3)
    again.setup("fit")
    assert again.val_set.samples == dm.val_set.samples  # seeded split


def test_imagefolder_names_unreadable_images_before_loading(tmp_path: Path) -> None:
    write_pngs(tmp_path / "train", {"cat": 3, "dog": 3})
    write_pngs(tmp_path / "val", {"cat": 2})
    empty = tmp_path / "train" / "cat" / "1.png"
    empty.write_bytes(b"")
    text = tmp_path / "val" / "cat" / "0.png"
    text.write_text("<html>not found</html>")
    whole = (tmp_path / "train" / "dog" / "0.png").read_bytes()
    cut = tmp_path / "train" / "dog" / "2.png"
    cut.write_bytes(whole[: len(whole) // 2])  # a sound header, the data cut short
    with pytest.raises(ValueError) as err:
        ImageFolderDataModule(tmp_path).check()
    message = str(err.value)
    assert message.startswith("3 of 8 image files cannot be read: ")
    for path in (empty, text, cut):
        assert f"{path} (" in message
    assert "cannot identify image file" in message and "\n" not in message
    assert "Remove or replace them" in message
    assert unreadable_images([tmp_path / "train" / "dog" / "1.png"]) == []
    # Unchecked, the cut file fails where it is decoded, still naming it.
    dm = ImageFolderDataModule(tmp_path, image_size=8, check_images=False)
    assert dm.check() == tmp_path / "train"
    dm.setup("fit")
    index = [p for p, _ in dm.train_set.samples].index(cut)
    with pytest.raises(OSError, match=rf"cannot decode image {cut}: .*remove or replace it"):
        dm.train_set[index]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"<class>/<image>\.png"):
        ImageFolderDataModule(tmp_path / "nothing").check()
    write_pngs(tmp_path / "train", {"cat": 2})
    write_pngs(tmp_path / "val", {"cat": 1, "yak": 1})
    with pytest.raises(ValueError, match="yak"):
        ImageFolderDataModule(tmp_path).setup("fit")
    with pytest.raises(ValueError, match="in_channels"):
        ImageFolderDataModule(tmp_path, in_channels=2)
    with pytest.raises(ValueError, match="mean"):
        ImageFolderDataModule(tmp_path, mean=(0.5,))
    write_pngs(tmp_path / "pool", {"cat": 3})
    with pytest.raises(ValueError, match="val_fraction > 0"):
        ImageFolderDataModule(tmp_path / "pool", val_fraction=0).setup("fit")
