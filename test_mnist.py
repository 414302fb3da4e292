"""Tests for mnist.py: python -m pytest

They need neither the network nor the real MNIST. Each test that loads data writes a few hundred
synthetic digits as genuine IDX files under the four real file names, so torchvision's own
loading code runs on them exactly as it does on MNIST.
"""

import gzip
import json
import shutil
import struct
import urllib.error
import urllib.request
from unittest.mock import Mock

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

import mnist

TRAIN_SIZE, TEST_SIZE = 300, 100
OUTPUT_FILES = ("metrics.json", "confusion_matrix.png", "training_curves.png", "misclassified.png",
                "model.pt")


# --- helpers ---------------------------------------------------------------------------------

def write_idx(path, array):
    """Write a uint8 array as an IDX file: magic number, one size per dimension, then the bytes."""
    header = struct.pack(f">{1 + array.ndim}I", 2048 + array.ndim, *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def synthetic_digits(count, seed):
    """Digit d is a bright bar across row 2 * d + 4 on faint noise: learnable, not instantly."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    images = rng.integers(0, 60, (count, 28, 28))
    for image, label in zip(images, labels):
        image[2 * label + 4, 4:24] = 255
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_mnist(data_dir, names=mnist.MNIST_FILES):
    """Write synthetic train and test splits as <data_dir>/MNIST/raw/<name>; return that folder."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_digits(TRAIN_SIZE, seed=1)
    test_images, test_labels = synthetic_digits(TEST_SIZE, seed=2)
    arrays = dict(zip(mnist.MNIST_FILES, (train_images, train_labels, test_images, test_labels)))
    for name in names:
        write_idx(raw / name, arrays[name])
    return raw


@pytest.fixture
def data_dir(tmp_path):
    write_mnist(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail the way it does with no network."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


def fail(argv, capsys):
    """Run main(argv), which must exit with an error; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(argv)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr  # one line, whatever went wrong
    return exit_info.value.code, stderr


def args_for(data_dir, output_dir, *extra):
    return ["--data-dir", str(data_dir), "--output-dir", str(output_dir), "--epochs", "2",
            "--batch-size", "64", "--device", "cpu", *extra]


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# --- model and data --------------------------------------------------------------------------

def test_model_maps_images_to_ten_logits_with_109386_parameters():
    model = mnist.MLP()
    assert mnist.count_parameters(model) == 109_386
    assert model(torch.zeros(5, 28, 28)).shape == (5, 10)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)  # the DataLoader's layout


def test_load_mnist_gives_normalized_tensors_of_the_right_shapes(data_dir):
    train_images, train_labels, test_images, test_labels, mean, std = mnist.load_mnist(
        data_dir, torch.device("cpu"))
    assert train_images.shape == (TRAIN_SIZE, 28, 28) and train_images.dtype == torch.float32
    assert test_images.shape == (TEST_SIZE, 28, 28) and test_images.dtype == torch.float32
    assert train_labels.shape == (TRAIN_SIZE,) and train_labels.dtype == torch.int64
    assert test_labels.shape == (TEST_SIZE,) and test_labels.dtype == torch.int64
    assert abs(train_images.mean().item()) < 1e-4 and abs(train_images.std().item() - 1) < 1e-4
    # The test set is scaled with the *training* statistics, not its own.
    raw_test, labels = synthetic_digits(TEST_SIZE, seed=2)
    expected = (torch.from_numpy(raw_test).float() / 255 - mean) / std
    assert torch.allclose(test_images, expected, atol=1e-5)
    assert test_labels.tolist() == labels.tolist()


def test_dataloader_pipeline_sees_the_same_digits_as_the_tensors(data_dir):
    train_images, train_labels, _, _, mean, std = mnist.load_mnist(data_dir, torch.device("cpu"))
    loader = mnist.make_dataloader(data_dir, 32, 0, mean, std, torch.Generator().manual_seed(0))
    image, label = loader.dataset[7]
    assert image.shape == (1, 28, 28)
    assert torch.allclose(image[0], train_images[7], atol=1e-5) and label == train_labels[7]


def test_shift_randomly_moves_each_digit_by_at_most_max_shift():
    images = torch.zeros(90, 28, 28)
    images[:, 14, 14] = 1.0  # one bright pixel in the middle of each digit
    shifted = mnist.shift_randomly(images, max_shift=1, background=0.0)
    where = shifted.flatten(1).argmax(dim=1)
    rows, columns = where // 28, where % 28
    assert shifted.sum(dim=(1, 2)).eq(1).all()  # nothing lost or invented
    assert set(rows.tolist()) == {13, 14, 15} and set(columns.tolist()) == {13, 14, 15}
    pairs = set(zip(rows.tolist(), columns.tolist()))
    assert len(pairs) == 9  # every one of the nine windows is used


def test_shuffled_batches_cover_every_digit_once_in_a_new_order_each_epoch():
    images = torch.arange(10.0).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = list(mnist.shuffled_batches(images, labels, 4, 0, 0.0, generator))
        assert [len(batch_labels) for _, batch_labels in batches] == [4, 4, 2]
        for batch_images, batch_labels in batches:
            assert torch.equal(batch_images[:, 0, 0], batch_labels.float())  # pairs stay together
        orders.append(torch.cat([batch_labels for _, batch_labels in batches]).tolist())
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]


# --- training and evaluation -----------------------------------------------------------------

def test_one_batch_overfits_to_100_percent():
    """A working model, loss and optimizer can memorize 64 random digits with random labels."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 28, 28), torch.randint(0, 10, (64,))
    model = mnist.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = mnist.make_scheduler(optimizer, "constant", 200)
    for _ in range(200):
        mnist.train_one_epoch(model, [(images, labels)], optimizer, scheduler)
    result = mnist.evaluate(model, images, labels)
    assert result["accuracy"] == 1.0 and result["loss"] < 0.01


def test_train_one_epoch_averages_over_examples_not_batches():
    """300 examples in batches of 128: a mean of batch means would weight the last 44 too much."""
    torch.manual_seed(0)
    images, labels = torch.randn(300, 28, 28), torch.randint(0, 10, (300,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # no dropout, so no randomness
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights never move
    scheduler = mnist.make_scheduler(optimizer, "constant", 3)
    batches = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, 300, 128)]
    loss, accuracy = mnist.train_one_epoch(model, batches, optimizer, scheduler)
    with torch.no_grad():
        logits = model(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == (logits.argmax(dim=1) == labels).sum().item() / 300


def test_train_one_epoch_syncs_with_the_device_once_per_epoch_not_per_batch(monkeypatch):
    """.item() makes the CPU wait for the GPU; the loop itself must not call it per batch."""
    calls = []
    original_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or original_item(self))
    batches = [(torch.randn(8, 28, 28), torch.randint(0, 10, (8,)))] * 10
    # Mocks stand in for the optimizer and scheduler: what torch does inside them is not ours.
    mnist.train_one_epoch(mnist.MLP(), batches, Mock(), Mock())
    assert len(calls) == 2  # the loss and the accuracy, once each, after the last batch


def test_one_cycle_schedule_warms_up_then_anneals():
    optimizer = torch.optim.Adam(mnist.MLP().parameters(), lr=3e-3)
    scheduler = mnist.make_scheduler(optimizer, "one-cycle", 100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = rates.index(max(rates))
    assert 10 <= peak <= 20 and max(rates) == pytest.approx(3e-3)
    assert rates[0] < 3e-4 and rates[-1] < 1e-5


# --- the whole run: metrics and reports ------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run the script once on synthetic data; several tests read what it wrote."""
    folder = tmp_path_factory.mktemp("run")
    write_mnist(folder / "data")
    metrics = mnist.main(args_for(folder / "data", folder / "outputs", "--batch-size", "64"))
    return folder, metrics


def test_metrics_json_has_every_field(finished_run):
    folder, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    for key in ("settings", "history", "train_accuracy", "test_accuracy", "test_loss", "per_class",
                "confusion_matrix", "seconds"):
        assert key in metrics
    flags = ("epochs", "batch_size", "lr", "lr_schedule", "max_shift", "seed", "device", "loader",
             "data_dir", "output_dir", "dry_run", "show")
    for key in flags + ("device_used", "torch_version"):
        assert key in metrics["settings"]
    assert metrics["settings"]["torch_version"] == torch.__version__
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    for row in metrics["history"]:
        assert set(row) == {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                            "seconds"}
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
    assert 0 <= metrics["train_accuracy"] <= 1 and 0 <= metrics["test_accuracy"] <= 1
    assert sorted(metrics["per_class"]) == [str(digit) for digit in range(10)]
    for scores in metrics["per_class"].values():
        assert set(scores) == {"precision", "recall", "f1", "support"}


def test_confusion_matrix_agrees_with_the_test_accuracy(finished_run):
    folder, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.dtype.kind == "i"
    assert matrix.sum() == TEST_SIZE
    assert np.trace(matrix) / matrix.sum() == metrics["test_accuracy"]


def test_saved_model_reproduces_the_reported_metrics(finished_run):
    """Reload model.pt as the README shows and check every reported number against sklearn."""
    folder, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    model = mnist.MLP()
    model.load_state_dict(torch.load(folder / "outputs" / "model.pt", weights_only=True))
    model.eval()
    raw_images, labels = synthetic_digits(TEST_SIZE, seed=2)
    mean, std = metrics["normalization"]["mean"], metrics["normalization"]["std"]
    with torch.no_grad():
        predictions = model((torch.from_numpy(raw_images).float() / 255 - mean) / std).argmax(dim=1)
    assert (predictions.numpy() == labels).mean() == metrics["test_accuracy"]
    matrix = confusion_matrix(labels, predictions, labels=range(10))
    assert matrix.tolist() == metrics["confusion_matrix"]
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(10), zero_division=0)
    for digit in range(10):
        scores = metrics["per_class"][str(digit)]
        assert scores["precision"] == pytest.approx(precision[digit])
        assert scores["recall"] == pytest.approx(recall[digit])
        assert scores["f1"] == pytest.approx(f1[digit])
        assert scores["support"] == support[digit]


def test_every_figure_is_a_real_png(finished_run):
    folder, _ = finished_run
    for name in ("confusion_matrix.png", "training_curves.png", "misclassified.png"):
        with Image.open(folder / "outputs" / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            image.verify()
    assert sorted(path.name for path in (folder / "outputs").iterdir()) == sorted(OUTPUT_FILES)


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(finished_run):
    folder, first = finished_run

    def comparable(metrics):
        metrics = json.loads(json.dumps(metrics))  # a deep copy
        del metrics["seconds"], metrics["settings"]["output_dir"]
        for row in metrics["history"]:
            del row["seconds"]
        return metrics

    again = mnist.main(args_for(folder / "data", folder / "again", "--batch-size", "64"))
    other = mnist.main(args_for(folder / "data", folder / "other", "--batch-size", "64",
                                "--seed", "1"))
    assert comparable(again) == comparable(first)
    assert comparable(other)["history"] != comparable(first)["history"]
    saved = json.loads((folder / "again" / "metrics.json").read_text())
    assert saved["test_loss"] == first["test_loss"]


def test_dry_run_with_the_classic_dataloader_and_a_batch_larger_than_the_data(data_dir, tmp_path):
    metrics = mnist.main(args_for(data_dir, tmp_path / "out", "--dry-run", "--loader", "dataloader",
                                  "--batch-size", "100000"))
    assert len(metrics["history"]) == 1
    assert sum(map(sum, metrics["confusion_matrix"])) == TEST_SIZE
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(OUTPUT_FILES)


# --- bad data: one clear line, the right exit code -------------------------------------------

def test_download_failure_says_where_to_put_which_files(tmp_path, offline, previous_outputs,
                                                        capsys):
    output_dir, before = previous_outputs
    code, message = fail(args_for(tmp_path / "nothing-here", output_dir), capsys)
    assert code == 1 and snapshot(output_dir) == before
    assert "could not download MNIST" in message
    assert str((tmp_path / "nothing-here" / "MNIST" / "raw").resolve()) in message
    for name in mnist.MNIST_FILES:
        assert name in message
    assert ".gz" in message and "unpacked" in message and "--data-dir" in message


def test_only_some_files_present_names_the_missing_ones(tmp_path, offline, capsys):
    write_mnist(tmp_path / "data", names=mnist.MNIST_FILES[:2])
    code, message = fail(args_for(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1
    assert "missing: t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)" in message


def test_files_with_dotted_names_get_exact_rename_advice(tmp_path, offline, capsys):
    raw = write_mnist(tmp_path / "data")
    (raw / "train-images-idx3-ubyte").rename(raw / "train-images.idx3-ubyte")
    code, message = fail(args_for(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1
    assert "rename train-images.idx3-ubyte to train-images-idx3-ubyte" in message


def test_a_gz_that_fails_its_checksum_is_called_damaged(tmp_path, offline, capsys):
    raw = write_mnist(tmp_path / "data", names=mnist.MNIST_FILES[1:])
    # A real gzip of the wrong bytes, then one that is not gzip at all: both fail MD5.
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not MNIST"))
    code, message = fail(args_for(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1 and "damaged, with the wrong MD5 sum: train-images-idx3-ubyte.gz" in message
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    code, message = fail(args_for(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1 and "damaged, with the wrong MD5 sum" in message


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[: len(data) // 2], "bytes where its header promises"),  # half unpacked
    (lambda data: data[:6], "only 6 bytes long"),
    (lambda data: struct.pack(">I", 1234) + data[4:], "magic number is 1234"),
])
def test_truncated_or_corrupt_files_are_named_with_what_to_do(data_dir, previous_outputs, capsys,
                                                              damage, words):
    output_dir, before = previous_outputs
    path = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    code, message = fail(args_for(data_dir, output_dir), capsys)
    assert code == 2 and snapshot(output_dir) == before
    assert str(path.resolve()) in message and words in message
    assert "Delete it and run again" in message


def test_image_and_label_counts_that_disagree(data_dir, tmp_path, capsys):
    write_idx(data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(TRAIN_SIZE - 1))
    code, message = fail(args_for(data_dir, tmp_path / "out"), capsys)
    assert code == 2
    assert f"{TRAIN_SIZE} images but" in message and f"{TRAIN_SIZE - 1} labels" in message


def test_labels_outside_0_to_9(data_dir, tmp_path, capsys):
    write_idx(data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.full(TEST_SIZE, 12))
    code, message = fail(args_for(data_dir, tmp_path / "out"), capsys)
    assert code == 2 and "labels outside 0-9" in message and "t10k-labels-idx1-ubyte" in message


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("not a folder")
    code, message = fail(args_for(tmp_path / "data.txt", tmp_path / "out"), capsys)
    assert code == 2 and "--data-dir" in message and "is a file" in message


# --- bad flags -------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--epochs", "0", "positive whole number"),
    ("--epochs", "-3", "positive whole number"),
    ("--batch-size", "0", "positive whole number"),
    ("--lr", "0", "positive finite number"),
    ("--lr", "-0.1", "positive finite number"),
    ("--lr", "nan", "positive finite number"),
    ("--lr", "inf", "positive finite number"),
    ("--lr", "fast", "invalid positive_float value"),
    ("--device", "tpu", "invalid choice: 'tpu'"),
    ("--epoch", "3", "unrecognized arguments"),  # a typo, not an abbreviation of --epochs
])
def test_bad_flags_get_one_line_and_exit_code_2(tmp_path, capsys, flag, value, words):
    code, message = fail(args_for(tmp_path, tmp_path / "out", flag, value), capsys)
    assert code == 2 and flag in message and words in message


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_missing_gpu_suggests_auto(monkeypatch, tmp_path, capsys, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, message = fail(args_for(tmp_path, tmp_path / "out", "--device", device), capsys)
    assert code == 2 and f"finds no {device} device" in message and "--device auto" in message


def test_output_dir_that_is_a_file_or_cannot_be_created(data_dir, tmp_path, capsys):
    (tmp_path / "outputs").write_text("a file")
    code, message = fail(args_for(data_dir, tmp_path / "outputs"), capsys)
    assert code == 2 and "--output-dir" in message and "is a file" in message
    code, message = fail(args_for(data_dir, tmp_path / "outputs" / "below-a-file"), capsys)
    assert code == 2 and "cannot write to --output-dir" in message


# --- failures and Ctrl-C keep the previous run's files ---------------------------------------

@pytest.fixture
def previous_outputs(finished_run, tmp_path):
    """A copy of a finished run's outputs, to check that a failed run leaves them untouched."""
    folder, _ = finished_run
    shutil.copytree(folder / "outputs", tmp_path / "outputs")
    return tmp_path / "outputs", snapshot(tmp_path / "outputs")


def test_a_diverging_loss_stops_with_advice_and_writes_nothing(data_dir, previous_outputs, capsys):
    output_dir, before = previous_outputs
    code, message = fail(args_for(data_dir, output_dir, "--lr", "1e6"), capsys)
    assert code == 1 and "in epoch 1" in message
    assert "diverged" in message and "smaller --lr" in message
    assert snapshot(output_dir) == before


def test_ctrl_c_during_training_exits_130_and_keeps_old_files(data_dir, previous_outputs,
                                                                   monkeypatch, capsys):
    output_dir, before = previous_outputs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(mnist, "train_one_epoch", interrupt)
    code, message = fail(args_for(data_dir, output_dir), capsys)
    assert code == 130 and "interrupted" in message and "previous run's files" in message
    assert snapshot(output_dir) == before


def test_ctrl_c_while_writing_reports_keeps_old_files(data_dir, previous_outputs, monkeypatch,
                                                      capsys):
    """The interrupt lands after two new files exist in full: neither may replace an old one."""
    output_dir, before = previous_outputs
    original_save = mnist.save_figure
    saved = []

    def save_twice_then_interrupt(figure, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        original_save(figure, path)
        saved.append(path)
    monkeypatch.setattr(mnist, "save_figure", save_twice_then_interrupt)
    code, _ = fail(args_for(data_dir, output_dir, "--epochs", "1"), capsys)
    assert code == 130 and len(saved) == 2
    assert snapshot(output_dir) == before  # and no .partial files are left behind
