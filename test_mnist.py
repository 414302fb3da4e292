"""Tests for mnist.py: python -m pytest test_mnist.py

The first three are the checks the project promises, each short enough to copy into coursework:
the shapes, one batch overfit to 100 %, and the metrics a run writes. No test needs the network
or the real MNIST: write_mnist, at the end with the other helpers, writes a few hundred synthetic
digits as genuine IDX files, so torchvision's own loading code runs on them as on MNIST's.
"""

import collections
import contextlib
import copy
import functools
import gzip
import importlib.util
import io
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest.mock import Mock

import matplotlib
import matplotlib.figure

matplotlib.use("Agg")  # no windows, whatever machine runs the tests

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

import mnist  # noqa: E402

TRAIN_SIZE, TEST_SIZE, VALIDATION_SIZE = 300, 100, 50
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
REPORTS = ("metrics.json", "digits.png", "confusion_matrix.png", "training_curves.png",
           "misclassified.png", "first_layer.png", "model.pt")
SOURCE = Path(mnist.__file__).read_text(encoding="utf-8")
CORE = SOURCE[:SOURCE.index("\n# Part 2.")]    # Part 1: the original recipe
LESSON = SOURCE[:SOURCE.index("\n# Part 3.")]  # Parts 1 and 2


# --- the three checks the project promises ---------------------------------------------------

def test_shapes_a_batch_of_digits_gives_ten_scores_each_from_109386_parameters():
    model = mnist.MLP()
    assert model(torch.zeros(5, 28, 28)).shape == (5, 10)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)  # a DataLoader's (B, 1, 28, 28)
    # 784 x 128 + 128, 128 x 64 + 64 and 64 x 10 + 10 weights and biases
    assert sum(weights.numel() for weights in model.parameters()) == 109_386


def test_one_batch_overfits_to_100_percent():
    """A working model, loss and optimizer can memorize 64 random digits with random labels."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 28, 28), torch.randint(0, 10, (64,))
    model = mnist.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(200):
        mnist.train_one_epoch(model, [(images, labels)], optimizer)
    result = mnist.evaluate(model, images, labels)
    assert result["accuracy"] == 1.0 and result["loss"] < 0.01


def test_the_metrics_a_run_writes_are_those_of_the_model_it_saved(finished_run):
    """metrics.json's test accuracy and confusion matrix are what model.pt, reloaded, gives."""
    folder, _, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    model, (mean, std) = mnist.load_trained_model(folder / "outputs")
    images, labels = synthetic_digits(TEST_SIZE, seed=2)  # the run's test digits
    predicted = mnist.predict(model, torch.from_numpy(images) / 255, mean, std).argmax(dim=1)
    assert metrics["test_accuracy"] == (predicted.numpy() == labels).mean()
    assert metrics["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(10)
                                                           ).tolist()


# --- the data ----------------------------------------------------------------------------------

def test_load_mnist_splits_and_normalizes_with_the_training_part_only(tmp_path):
    """The held-out digits are made bright, so statistics that included them would show it."""
    raw = write_mnist(tmp_path / "data")
    images, labels = synthetic_digits(TRAIN_SIZE, seed=1)
    order = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(0))
    train, held_out = order[VALIDATION_SIZE:], order[:VALIDATION_SIZE]
    images[held_out.numpy()] = 255
    write_idx(raw / "train-images-idx3-ubyte", images)
    torch.manual_seed(1)  # the seed sets the global generator: the split must not follow it
    splits, (mean, std) = mnist.load_mnist(tmp_path / "data", VALIDATION_SIZE, "cpu")
    pixels = torch.from_numpy(images).float() / 255
    assert mean == pytest.approx(pixels[train].mean().item(), abs=1e-6)
    assert std == pytest.approx(pixels[train].std().item(), abs=1e-6)
    assert abs(mean - pixels.mean().item()) > 0.05  # the whole set's mean would differ clearly
    for name, indices in (("train", train), ("validation", held_out)):
        split_images, split_labels = splits[name]
        assert split_images.shape == (len(indices), 28, 28) and split_images.dtype == torch.float32
        assert torch.allclose(split_images, (pixels[indices] - mean) / std, atol=1e-5)
        assert split_labels.tolist() == labels[indices.numpy()].tolist()
    test_images, test_labels = synthetic_digits(TEST_SIZE, seed=2)
    assert torch.allclose(splits["test"][0], (torch.from_numpy(test_images) / 255 - mean) / std,
                          atol=1e-5)
    assert splits["test"][1].dtype == torch.int64
    assert splits["test"][1].tolist() == test_labels.tolist()
    torch.manual_seed(2)
    no_validation, _ = mnist.load_mnist(tmp_path / "data", 0, "cpu")
    assert set(no_validation) == {"train", "test"} and len(no_validation["train"][0]) == TRAIN_SIZE
    for size in (-5, TRAIN_SIZE):  # none held out is 0; all but one, 299
        with pytest.raises(ValueError, match=f"validation_size must be 0 to 299, not {size}"):
            mnist.load_mnist(tmp_path / "data", size, "cpu")


def test_describe_data_shows_each_split_and_the_training_pixels_range(capsys):
    splits = {"train": (torch.linspace(0, 1, 784).view(1, 28, 28), torch.tensor([3])),
              "test": (torch.full((2, 28, 28), -5.0), torch.tensor([1, 2]))}
    mnist.describe_data(splits, 0.13, 0.31)
    output = capsys.readouterr().out
    assert "     train: images (1, 28, 28) torch.float32, labels (1,) torch.int64" in output
    assert "      test: images (2, 28, 28)" in output
    assert output.endswith("mean 0.1300 and std 0.3100: now 0.00 to 1.00\n")


def test_shuffled_batches_cover_every_digit_once_in_a_new_order_each_epoch_on_any_device():
    images = torch.arange(10.0).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        batches = list(mnist.shuffled_batches(images, labels, 4, generator))
        assert [len(batch_labels) for _, batch_labels in batches] == [4, 4, 2]
        for batch_images, batch_labels in batches:
            assert torch.equal(batch_images[:, 0, 0], batch_labels.float())  # pairs stay together
        orders.append(torch.cat([batch_labels for _, batch_labels in batches]).tolist())
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]
    # The seed's generator draws the order, on the CPU whatever the device: the same batches.
    assert orders[0] == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    # On another device (meta: shapes without data) the CPU generator still draws the order.
    meta = mnist.shuffled_batches(torch.zeros(10, 28, 28, device="meta"),
                                  torch.arange(10, device="meta"), 4,
                                  torch.Generator().manual_seed(5))
    assert [tuple(images.shape) for images, _ in meta] == [(4, 28, 28), (4, 28, 28), (2, 28, 28)]


# --- the core: training, evaluation, and the original recipe -------------------------------

def test_train_one_epoch_averages_over_examples_not_over_batches():
    """300 examples in batches of 128: a mean of batch means would weight the last 44 too much."""
    torch.manual_seed(0)
    images, labels = torch.randn(300, 28, 28), torch.randint(0, 10, (300,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # no dropout, so no randomness
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights never move
    batches = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, 300, 128)]
    loss, accuracy = mnist.train_one_epoch(model, batches, optimizer)
    with torch.no_grad():
        logits = model(images)
    assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert accuracy == (logits.argmax(dim=1) == labels).sum().item() / 300


def test_train_one_epoch_takes_the_textbook_step_with_dropout_on_whatever_the_mode():
    """zero_grad, forward with dropout on, backward, step: the weights must come out bit for bit
    as from a loop written out here."""
    batches = [(torch.randn(16, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]

    def fresh():
        torch.manual_seed(1)  # the same first weights, and the same dropout draws after them
        model = mnist.MLP()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, optimizer = fresh()
    model.eval()  # as evaluation leaves it
    mnist.train_one_epoch(model, batches, optimizer)
    reference, optimizer = fresh()
    for images, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        optimizer.step()
    expected = reference.state_dict()
    for name, weights in model.state_dict().items():
        assert torch.equal(weights, expected[name]), name


def test_the_network_is_two_hidden_layers_with_relu_and_dropout():
    """784 -> 128 -> 64 -> 10, ReLU after each hidden layer; in training, dropout zeroes each
    hidden unit with probability p and scales the rest by 1 / (1 - p); in evaluation, none."""
    torch.manual_seed(0)
    model, digits = mnist.MLP(dropout=0.5), torch.randn(256, 28, 28)
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linear] == [(784, 128),
                                                                            (128, 64), (64, 10)]
    hidden = digits.flatten(1)
    for layer in linear[:2]:
        hidden = layer(hidden).clamp(min=0)
    assert torch.allclose(model.eval()(digits), linear[2](hidden), atol=1e-5)
    kept = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(lambda _, inputs, output: kept.append(
                (output[inputs[0] != 0] / inputs[0][inputs[0] != 0])))
    model.train()(digits)
    assert len(kept) == 2
    for ratios in kept:  # each unit either dropped (0) or scaled by 1 / (1 - 0.5) = 2
        assert set(ratios.unique().round(decimals=4).tolist()) <= {0.0, 2.0}
        assert 0.45 < (ratios == 0).float().mean() < 0.55
    no_dropout = mnist.MLP(dropout=0.0)
    assert torch.equal(no_dropout(digits), no_dropout(digits))  # dropout 0 turns it off


def test_evaluation_sees_at_most_1000_digits_at_once_and_scores_them_all():
    torch.manual_seed(0)
    model, images, labels = mnist.MLP(), torch.randn(2500, 28, 28), torch.randint(0, 10, (2500,))
    sizes = []
    model.register_forward_hook(lambda module, inputs, output: sizes.append(len(inputs[0])))
    result = mnist.evaluate(model.train(), images, labels)  # evaluate switches dropout off
    assert sizes == [1000, 1000, 500]
    with torch.no_grad():
        logits = model.eval()(images)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert torch.equal(result["predictions"], logits.argmax(dim=1))
    assert result["accuracy"] == (logits.argmax(dim=1) == labels).sum().item() / 2500
    assert torch.allclose(result["confidences"], logits.softmax(dim=1).amax(dim=1))


def test_final_scores_orient_the_matrix_and_order_the_mistakes_by_confidence(capsys):
    """Ten 5's: the first 4 read as 3 with rising confidence, the rest right. And three 2's,
    read right, so that precision and recall of 3 and 5 differ."""
    labels = torch.tensor([5] * 10 + [2] * 3)
    logits = torch.zeros(13, 10)
    logits[range(13), labels] = 4.0
    for i, sureness in enumerate([1.0, 3.0, 2.0, 6.0]):
        logits[i, 5], logits[i, 3] = 0.0, sureness
    images = torch.zeros(13, 28, 28)
    images[:, 0, :10] = logits
    split = (images, labels)
    scores = mnist.final_scores(FixedAnswers(), {"train": split, "test": split})
    matrix = scores["confusion_matrix"]
    assert matrix[5][3] == 4 and matrix[3][5] == 0 and matrix[5][5] == 6  # rows: true digits
    assert [m["index"] for m in scores["mistakes"]] == [3, 1, 2, 0]  # the surest first
    confidence = logits.softmax(dim=1).max(dim=1).values
    for mistake in scores["mistakes"]:
        assert (mistake["label"], mistake["predicted"]) == (5, 3)
        assert mistake["confidence"] == pytest.approx(confidence[mistake["index"]].item())
    assert scores["per_class"]["3"]["precision"] == 0 and scores["per_class"]["5"]["recall"] == 0.6
    assert scores["per_class"]["7"] == {"precision": 0, "recall": 0, "f1-score": 0, "support": 0}
    assert scores["per_class"]["5"]["precision"] == 1 and scores["per_class"]["5"]["support"] == 10
    assert scores["test_accuracy"] == 9 / 13 and set(scores) >= {"train_loss", "test_loss"}
    printed = capsys.readouterr().out
    assert "     5     1.0000    0.6000" in printed
    assert printed.endswith("train accuracy 69.23%, test accuracy 69.23%\n")
    labels = torch.zeros(40, dtype=torch.long)  # and at most 25 mistakes are kept:
    images = torch.zeros(40, 28, 28)
    images[:, 0, 1] = torch.arange(40.0) / 10  # every digit but the first read as 1, ever surer
    scores = mnist.final_scores(FixedAnswers(), {"test": (images, labels)})
    assert [m["index"] for m in scores["mistakes"]] == list(range(39, 14, -1))


@pytest.mark.parametrize("loss, diverged", [(math.nan, True), (23.1, True), (22.9, False)])
def test_training_stops_once_the_loss_passes_ten_times_a_guesss(monkeypatch, loss, diverged):
    """A guess scores ln(10) = 2.303: an epoch's loss above 23.03, or NaN, has diverged."""
    monkeypatch.setattr(mnist, "train_one_epoch", lambda *args: (loss, 0.1))
    with contextlib.nullcontext() if not diverged else pytest.raises(FloatingPointError,
                                                                      match="in epoch 1"):
        with contextlib.redirect_stdout(io.StringIO()):
            history = mnist.train_and_validate(mnist.MLP(), None, list, 1, None)
        assert history[0]["train_loss"] == loss


def test_the_core_pasted_alone_trains_with_its_defaults(tmp_path, monkeypatch, capsys):
    """Part 1 pasted alone into an empty notebook: train_original(), with every default (the
    data in data/, 5,000 digits held out, 10 epochs of batches of 64), trains and tests once.
    And Parts 1 and 2 pasted alone: train_model and the handwriting need nothing of Part 3."""
    write_mnist(tmp_path / "data", train_size=5_600, test_size=400)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "pasted"}
    exec(compile(CORE, "part-1", "exec"), namespace)
    assert not {"np", "Image", "ndimage", "train_model", "UserError"} & set(namespace)
    evaluated, evaluate = [], namespace["evaluate"]
    namespace["evaluate"] = lambda model, images, labels: evaluated.append(len(labels)) or \
        evaluate(model, images, labels)
    model, metrics = namespace["train_original"]()
    printed = capsys.readouterr().out
    assert len(metrics["history"]) == 10 and printed.count("validation loss") == 10
    assert evaluated.count(400) == 1 and printed.count("test accuracy") == 1  # the test, once
    assert metrics["test_accuracy"] >= 0.975 and metrics["val_accuracy"] >= 0.975
    assert isinstance(namespace["plot_confusion_matrix"](metrics["confusion_matrix"]),
                      matplotlib.figure.Figure)
    lesson = {"__name__": "pasted"}
    exec(compile(LESSON, "parts-1-2", "exec"), lesson)
    assert "UserError" not in lesson and "main" not in lesson  # Part 3's
    model, metrics = lesson["train_model"](dry_run=True)
    digit = lesson["prepare_digit"](draw_seven())
    assert lesson["predict"](model, digit[None], **metrics["normalization"]).shape == (1, 10)
    plt.close("all")


def test_train_model_with_the_original_settings_runs_the_original_recipe(data_dir):
    """train_model builds on the core's pieces: set as the original recipe, it trains exactly as
    train_original does, and reaches the same scores (with another seed and dropout, too)."""
    settings = dict(epochs=2, validation_size=VALIDATION_SIZE, data_dir=data_dir, device="cpu",
                    seed=3, dropout=0.1)
    with contextlib.redirect_stdout(io.StringIO()):
        _, original = mnist.train_original(**settings)
        _, model = mnist.train_model(batch_size=64, lr=1e-3, lr_schedule="constant", max_shift=0,
                                     **settings)
    assert [row["train_loss"] for row in original["history"]] == [
        row["train_loss"] for row in model["history"]]
    assert original["test_accuracy"] == model["test_accuracy"]
    assert model["learning_rates"] == [1e-3] * len(model["learning_rates"])


# --- Part 2: each step --------------------------------------------------------------------------

def test_loss_before_training_is_the_untrained_models_mean_loss_without_a_graph(capsys):
    torch.manual_seed(0)
    model, images, labels = mnist.MLP(), torch.randn(500, 28, 28), torch.randint(0, 10, (500,))
    grad_mode = []
    model.register_forward_hook(lambda *args: grad_mode.append(torch.is_grad_enabled()))
    mnist.loss_before_training(model, images, labels)
    assert grad_mode == [False]  # no graph: nothing will call backward()
    with torch.no_grad():
        expected = F.cross_entropy(model.eval()(images), labels).item()
    assert abs(expected - math.log(10)) < 0.1
    assert capsys.readouterr().out == f"loss before training: {expected:.3f} (a guess scores " \
                                      "ln(10) = 2.303)\n"


def test_trace_one_digit_shows_probabilities_and_the_optimizers_first_step(capsys):
    """Adam's first step, on copies with dropout off: the real model, its optimizer, their rate
    and the random numbers stay untouched."""
    torch.manual_seed(0)
    model = mnist.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    weights_before = copy.deepcopy(model.state_dict())
    random_state = torch.get_rng_state()
    probabilities, (before, gradient, after), (unit, pixel), reference, output = trace(
        model, optimizer, capsys)
    gradients = reference.layers[1].weight.grad
    assert abs(gradient) == gradients.abs().max().item()  # the largest in size, of either sign:
    assert gradient < 0  # here a negative one, larger in size than the largest positive one
    assert (gradients < 0).any() and (gradients > 0).any()
    assert gradients[unit, pixel].item() == gradient
    assert model.layers[1].weight[unit, pixel].item() == before
    assert probabilities.shape == (10,) and probabilities.sum().item() == pytest.approx(1, abs=1e-6)
    # Adam's first step: m = (1 - beta1) g and v = (1 - beta2) g^2, both divided by their bias
    # corrections, give m / sqrt(v) = g / |g|: the weight moves by lr against its gradient.
    assert after == pytest.approx(before - 0.01 * gradient / (abs(gradient) + 1e-8), abs=1e-7)
    assert torch.equal(torch.get_rng_state(), random_state)  # no random numbers drawn
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_before[key])  # the real model did not move
    assert model.training  # and it was not switched to eval mode
    assert optimizer.state == {} and optimizer.param_groups[0]["lr"] == 0.01
    assert len(output.splitlines()) == 6 and f"-ln(p[3]) = -ln({probabilities[3]:.3f})" in output
    assert output.splitlines()[-1] == (f"  Adam's first step, at lr = 0.010000, moves it by "
                                       f"{after - before:+.6f} to {after:+.6f}")


def test_the_trace_follows_a_convolutions_first_filters_too(capsys):
    """README exercise 8 puts a convolution first: a row per filter, a column per 3 x 3 weight."""
    torch.manual_seed(0)
    model = mnist.MLP()
    model.layers = nn.Sequential(nn.Unflatten(1, (1, 28)), nn.Conv2d(1, 4, 3), nn.Flatten(),
                                 nn.Linear(4 * 26 * 26, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _, (before, gradient, after), (unit, pixel), reference, _ = trace(model, optimizer, capsys)
    assert 0 <= unit < 4 and 0 <= pixel < 9  # a row per filter, a column per 3 x 3 weight
    assert abs(gradient) == reference.layers[1].weight.grad.abs().max().item()
    assert model.layers[1].weight.flatten(1)[unit, pixel].item() == before
    assert after == pytest.approx(before - 0.01 * math.copysign(1, gradient), abs=1e-7)


def test_one_cycle_warms_up_then_anneals_with_beta1_held_and_constant_stays():
    """The rates that schedule_rates records are the ones each optimizer step used, in a loop
    that knows nothing of the schedule."""
    seen, rates = replay_schedule("one-cycle", 3e-3, 100)
    used = [rate for rate, _ in seen]
    assert rates == used
    peak = used.index(max(used))
    assert 10 <= peak <= 20 and max(used) == pytest.approx(3e-3)
    assert used[0] == pytest.approx(3e-3 / 25) and used[-1] < 1e-5
    assert all(beta1 == 0.9 for _, beta1 in seen)  # Adam's default, left alone
    assert replay_schedule("constant", 1e-3, 5) == ([(1e-3, 0.9)] * 5, [1e-3] * 5)
    # The core's train_one_epoch, unchanged, takes each step at the rate the schedule set.
    torch.manual_seed(0)
    model = mnist.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    rates = mnist.schedule_rates(optimizer, "one-cycle", 1e-2, 20)
    used = []
    optimizer.register_step_pre_hook(lambda *args: used.append(optimizer.param_groups[0]["lr"]))
    batches = [(torch.randn(8, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    mnist.train_one_epoch(model, batches, optimizer)
    mnist.train_one_epoch(model, batches, optimizer)
    assert rates == used and len(used) == 6 and used[0] < used[-1]  # the warm-up rises


def test_shift_randomly_moves_each_digit_by_at_most_max_shift():
    images = torch.zeros(90, 28, 28)
    images[:, 14, 14] = 1.0  # one bright pixel in the middle of each digit
    shifted = mnist.shift_randomly(images, 1, 0.0, torch.Generator().manual_seed(0))
    assert shifted.sum(dim=(1, 2)).eq(1).all()  # nothing lost or invented
    assert set(where_the_dot_went(shifted)) == {(14 + dy, 14 + dx) for dy in (-1, 0, 1)
                                               for dx in (-1, 0, 1)}  # all nine windows
    edge = mnist.shift_randomly(torch.zeros(50, 28, 28), 1, -0.5, torch.Generator().manual_seed(0))
    assert set(edge.unique().tolist()) == {0.0, -0.5}  # the moved-in edge is the background
    assert (edge == -0.5).any(dim=(1, 2)).sum() >= 40  # 8 of the 9 windows pad an edge
    assert torch.equal(mnist.shift_randomly(images, 2, 0.0, torch.Generator().manual_seed(3)),
                       mnist.shift_randomly(images, 2, 0.0, torch.Generator().manual_seed(3)))
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    assert mnist.shift_randomly(images, 0, 0.0, generator) is images  # 0: no shift, no draw
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("batch_size, max_shift", [(1, 1), (64, 4)])
def test_every_shift_is_equally_likely_for_every_digit_at_any_batch_size(batch_size, max_shift):
    """Batch size 1 shifts digits every way, and a batch smaller than the (2s + 1)^2 shifts
    reaches all of them: over an epoch each shift comes up about equally often."""
    count, shifts = 81 * 40, (2 * max_shift + 1) ** 2
    images = torch.zeros(count, 28, 28)
    images[:, 14, 14] = 1.0
    generator = torch.Generator().manual_seed(0)
    shifted = torch.cat([mnist.shift_randomly(batch, max_shift, 0.0, generator)
                         for batch in images.split(batch_size)])
    seen = collections.Counter(where_the_dot_went(shifted))
    assert len(seen) == shifts
    expected = count / shifts  # 360 for 9 shifts, 40 for 81
    assert all(abs(n - expected) < 4.5 * math.sqrt(expected) for n in seen.values()), seen


def test_train_model_shifts_with_black_and_the_seeds_generator(data_dir, monkeypatch):
    """The shifts fill in with black, and draw from the seed's generator, which also draws the
    batch order (the flags' test shows each setting reach the run)."""
    shifts, shift_randomly = [], mnist.shift_randomly
    monkeypatch.setattr(mnist, "shift_randomly", lambda *args: shifts.append(args) or
                        shift_randomly(*args))
    orders, shuffled_batches = [], mnist.shuffled_batches
    monkeypatch.setattr(mnist, "shuffled_batches", lambda *args: orders.append(args) or
                        shuffled_batches(*args))
    _, metrics = quiet_train(data_dir, epochs=2, seed=3, max_shift=2)
    mean, std = metrics["normalization"].values()
    _, max_shift, background, rng = shifts[0]
    assert len(orders) == 2 and len(shifts) == 2 * math.ceil((TRAIN_SIZE - VALIDATION_SIZE) / 64)
    assert all(args[-1] is rng for args in shifts + orders)  # one generator, for both
    assert max_shift == 2 and background == pytest.approx(-mean / std)  # a black pixel
    assert rng.initial_seed() == 3 and rng.device.type == "cpu"  # the order follows the seed


def test_each_history_row_holds_what_that_epoch_measured_and_the_test_set_is_scored_once(
        data_dir, monkeypatch):
    returned = []
    for name in ("train_one_epoch", "evaluate"):
        original = getattr(mnist, name)
        monkeypatch.setattr(mnist, name, lambda *args, original=original: returned.append(
            original(*args)) or returned[-1])
    model, metrics = quiet_train(data_dir, epochs=2)
    # Per epoch: one train_one_epoch, then one evaluate of the validation digits; at the end one
    # evaluate each of the training, validation and test digits: the test set, once.
    scored = [len(result["predictions"]) for result in returned if isinstance(result, dict)]
    assert scored == [VALIDATION_SIZE, VALIDATION_SIZE, 250, VALIDATION_SIZE, TEST_SIZE]
    epochs = [returned[2 * i: 2 + 2 * i] for i in range(2)]
    for row, ((train_loss, train_accuracy), validation) in zip(metrics["history"], epochs):
        assert (row["train_loss"], row["train_accuracy"]) == (train_loss, train_accuracy)
        assert (row["val_loss"], row["val_accuracy"]) == (validation["loss"],
                                                          validation["accuracy"])
    final = dict(zip(("train", "val", "test"), returned[-3:]))
    for split, scores in final.items():
        assert metrics[f"{split}_loss"] == scores["loss"]
        assert metrics[f"{split}_accuracy"] == scores["accuracy"]
    splits, _ = mnist.load_mnist(data_dir, VALIDATION_SIZE, "cpu")
    with torch.no_grad():
        assert metrics["test_loss"] == F.cross_entropy(model.eval()(splits["test"][0]),
                                                       splits["test"][1]).item()


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(finished_run):
    folder, first, _ = finished_run

    def comparable(metrics):
        metrics = json.loads(json.dumps(metrics))  # a deep copy
        del metrics["seconds"], metrics["settings"]["seed"]
        for row in metrics["history"]:
            del row["seconds"]
        return metrics

    again = quiet_train(str(folder / "data"), seed=0)[1]
    other = quiet_train(str(folder / "data"), seed=1)[1]
    assert comparable(again) == comparable(first)
    assert comparable(other)["history"] != comparable(first)["history"]


# --- the whole run: metrics and reports --------------------------------------------------------

def test_metrics_json_has_every_field(finished_run):
    folder, _, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    assert {"settings", "normalization", "history", "train_accuracy", "train_loss", "val_accuracy",
            "val_loss", "test_accuracy", "test_loss", "per_class", "confusion_matrix", "mistakes",
            "learning_rates", "seconds"} == set(metrics)
    assert metrics["settings"] == {
        "epochs": 2, "batch_size": 64, "lr": 3e-3, "lr_schedule": "one-cycle", "max_shift": 1,
        "dropout": 0.2, "validation_size": VALIDATION_SIZE, "seed": 0, "data_dir": str(folder /
        "data"), "device": "cpu", "dry_run": False, "torch_version": torch.__version__}
    assert [row["epoch"] for row in metrics["history"]] == [1, 2]
    for row in metrics["history"]:
        assert set(row) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                            "seconds"}
    assert metrics["history"][-1]["val_accuracy"] == metrics["val_accuracy"]
    assert 0 < sum(row["seconds"] for row in metrics["history"]) < metrics["seconds"]
    assert sorted(metrics["per_class"]) == [str(digit) for digit in range(10)]
    steps = 2 * math.ceil((TRAIN_SIZE - VALIDATION_SIZE) / 64)
    assert metrics["learning_rates"] == replay_schedule("one-cycle", 3e-3, steps)[1]


def test_the_run_prints_its_data_the_loss_before_training_and_a_row_per_epoch(finished_run):
    _, metrics, output = finished_run
    assert "train: images (250, 28, 28) torch.float32, labels (250,) torch.int64" in output
    assert "validation: images (50, 28, 28)" in output and "test: images (100, 28, 28)" in output
    assert re.search(r"pixels: 0-255 .* now -\d\.\d\d to \d\.\d\d", output)
    assert "(1): Linear(in_features=784, out_features=128, bias=True)" in output
    assert "\nparameters: 109,386\n" in output  # the model and its size, printed before training
    loss = float(re.search(r"^loss before training: (\d\.\d+)", output, re.MULTILINE).group(1))
    assert abs(loss - math.log(10)) < 0.15
    assert "Adam's first step, at lr = 0.003000" in output  # the trace at the recipe's rate
    rows = re.findall(r"^epoch +(\d+) +train loss (\S+) accuracy +(\S+)% +validation loss (\S+) "
                      r"accuracy +(\S+)% +\S+ s$", output, re.MULTILINE)
    assert [int(row[0]) for row in rows] == [1, 2]
    assert float(rows[-1][4]) == pytest.approx(100 * metrics["val_accuracy"], abs=0.006)


def test_each_digits_scores_and_the_mistakes_are_those_of_the_saved_model(finished_run):
    """Reload model.pt as --predict does and check per-digit scores and mistakes with sklearn."""
    folder, _, _ = finished_run
    metrics = json.loads((folder / "outputs" / "metrics.json").read_text())
    model, (mean, std) = mnist.load_trained_model(folder / "outputs")
    raw_images, labels = synthetic_digits(TEST_SIZE, seed=2)
    probabilities = mnist.predict(model, torch.from_numpy(raw_images) / 255, mean, std)
    confidences, predictions = probabilities.max(dim=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(10), zero_division=0)
    for digit in range(10):
        scores = metrics["per_class"][str(digit)]
        assert scores["precision"] == pytest.approx(precision[digit])
        assert scores["recall"] == pytest.approx(recall[digit])
        assert scores["f1-score"] == pytest.approx(f1[digit])
        assert scores["support"] == support[digit]
    wrong = [i for i in range(TEST_SIZE) if predictions[i] != labels[i]]
    assert wrong  # so that the checks below check something
    surest_first = sorted(wrong, key=lambda i: -confidences[i])
    assert [mistake["index"] for mistake in metrics["mistakes"]] == surest_first[:25]
    for mistake in metrics["mistakes"]:
        i = mistake["index"]
        assert (mistake["label"], mistake["predicted"]) == (labels[i], predictions[i])
        assert mistake["confidence"] == pytest.approx(confidences[i].item())


def test_each_figure_is_the_one_its_name_says(finished_run):
    """Each PNG has its own figure's size, and each figure its own titles."""
    folder, _, _ = finished_run
    outputs = folder / "outputs"
    assert sorted(path.name for path in outputs.iterdir()) == sorted(REPORTS)
    model, _ = mnist.load_trained_model(outputs)
    metrics = json.loads((outputs / "metrics.json").read_text())
    figures = mnist.draw_reports(model, metrics, mnist.fetch_mnist(folder / "data"))
    titles = {name: " ".join([figure.get_suptitle()] + [axes.get_title() for axes in figure.axes])
              for name, figure in figures.items()}
    assert "first digits in MNIST's training file" in titles["digits.png"]
    assert "loss accuracy the schedule, per step" in titles["training_curves.png"]
    assert "Confusion matrix on the test set" in titles["confusion_matrix.png"]
    assert len(figures["confusion_matrix.png"].axes) == 1  # the heatmap alone, no colour bar
    counts = [text.get_text() for text in figures["confusion_matrix.png"].axes[0].texts]
    assert counts == [str(n) for row in metrics["confusion_matrix"] for n in row]  # every cell
    assert "Test digits the model got wrong" in titles["misclassified.png"]
    assert "The 128 first-layer units' weights" in titles["first_layer.png"]
    sizes = {name: tuple(round(inches * 100) for inches in figure.get_size_inches())
             for name, figure in figures.items()}
    assert len(set(sizes.values())) == len(sizes)  # so that two swapped files would show
    assert (sizes["digits.png"], sizes["training_curves.png"]) == ((1440, 680), (1500, 400))
    for name, size in sizes.items():
        with Image.open(outputs / name) as image:
            # Within a pixel: matplotlib 3.8 cuts 1.8 inches x 100 dpi, 179.99..., to 179.
            assert image.format == "PNG" and max(abs(a - b) for a, b in zip(image.size, size)) <= 1
            image.verify()
    plt.close("all")


def test_a_dry_run_trains_one_epoch_of_three_batches_and_scores_at_most_1000_digits(
        tmp_path, monkeypatch):
    write_mnist(tmp_path / "data", train_size=2_600, test_size=1_200)
    monkeypatch.setattr(mnist, "draw_reports", lambda *args: {})  # metrics.json is enough
    sizes, evaluate = [], mnist.evaluate
    monkeypatch.setattr(mnist, "evaluate", lambda model, images, labels: sizes.append(
        len(labels)) or evaluate(model, images, labels))
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = mnist.main(args_for(tmp_path / "data", tmp_path / "out", "--dry-run", "--epochs",
                                      "5", "--batch-size", "32", "--validation-size", "1500"))
    assert metrics["settings"]["epochs"] == 1 and metrics["settings"]["dry_run"] is True
    assert len(metrics["history"]) == 1 and len(metrics["learning_rates"]) == 3
    # The epoch's validation, then the final scores: 3 x 32 training digits, 1,000 of the rest.
    assert sizes == [1000, 96, 1000, 1000]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sum(map(sum, written["confusion_matrix"])) == 1000
    assert sum(row["support"] for row in written["per_class"].values()) == 1000


def test_every_training_flag_takes_effect(data_dir, tmp_path, capsys, monkeypatch):
    """main() with every training flag away from its default: each setting shows in what the
    run wrote, and the run is the recipe's run with those settings, no other."""
    monkeypatch.setattr(mnist, "draw_reports", lambda *args: {})  # metrics.json is enough
    flags = {"epochs": 3, "batch_size": 32, "lr": 0.002, "lr_schedule": "constant",
             "max_shift": 0, "dropout": 0.0, "seed": 5, "validation_size": 0}
    mnist.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"), "--device",
                "cpu", *[str(item) for name, value in flags.items()
                         for item in (f"--{name.replace('_', '-')}", value)]])
    output = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    steps = 3 * math.ceil(TRAIN_SIZE / 32)  # 3 epochs of all 300 digits, 32 at a time
    assert written["learning_rates"] == [0.002] * steps  # constant, at --lr
    assert [row["epoch"] for row in written["history"]] == [1, 2, 3]
    assert not any(key.startswith("val_") for key in written)  # no validation split, no rows:
    assert all(set(row) == {"epoch", "train_loss", "train_accuracy", "seconds"}
               for row in written["history"])
    assert f"train: images ({TRAIN_SIZE}, 28, 28)" in output and "validation:" not in output
    assert "validation loss" not in output
    figure = mnist.plot_training_curves(written["history"], written["learning_rates"])
    assert [len(axes.lines) for axes in figure.axes] == [1, 1, 1]  # train only, and the rate
    torch.manual_seed(5)  # the seed's first weights are the ones the trace shows, before a step
    unit, pixel, before = re.search(r"unit (\d+)'s weight for pixel (\d+), now (\S+)",
                                    output).groups()
    assert f"{mnist.MLP().layers[1].weight[int(unit), int(pixel)].item():+.6f}" == before
    _, recipe = quiet_train(str(data_dir), **flags)  # no dropout and no shifts: the same run
    assert [row["train_loss"] for row in recipe["history"]] == [
        row["train_loss"] for row in written["history"]]
    assert {name: written["settings"][name] for name in flags} == flags
    for name, value in (("dropout", 0.5), ("max_shift", 2)):  # either, alone, changes the run
        _, other = quiet_train(data_dir, **{**flags, name: value})
        assert other["history"][0]["train_loss"] != written["history"][0]["train_loss"]
    plt.close("all")


def test_a_default_changed_in_train_models_signature_is_the_flags_default(tmp_path, capsys):
    """Each default is written once, in train_model's signature: in a copy with other defaults,
    the flags have those, and --help says so."""
    student = student_copy(tmp_path, "seven_epochs", "def train_model(epochs=10, batch_size=256,",
                           "def train_model(epochs=7, batch_size=128,")
    args = student.parse_args([])
    assert (args.epochs, args.batch_size) == (7, 128)
    assert (args.lr, args.lr_schedule, args.max_shift, args.dropout, args.validation_size,
            args.seed, args.data_dir, args.device, args.dry_run) == (
                3e-3, "one-cycle", 1, 0.2, 5000, 0, "data", "auto", False)
    with pytest.raises(SystemExit):
        student.parse_args(["--help"])
    assert "passes over the training digits (default: 7)" in " ".join(
        capsys.readouterr().out.split())


def test_a_run_probes_the_device_once_and_reads_mnist_once(tmp_path, monkeypatch):
    write_mnist(tmp_path / "fresh")  # read by no earlier test: the cache is empty
    monkeypatch.setattr(mnist, "draw_reports", lambda *args: {})
    probes, ones = [], torch.ones
    monkeypatch.setattr(torch, "ones", lambda *size, **kwargs: probes.append(kwargs) or
                        ones(*size, **kwargs))
    reads, dataset = collections.Counter(), torchvision.datasets.MNIST
    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda root, train, **kwargs: reads.update(
        [train]) or dataset(root, train, **kwargs))
    with contextlib.redirect_stdout(io.StringIO()):
        mnist.main(args_for(tmp_path / "fresh", tmp_path / "out", "--device", "auto"))
    assert [kwargs["device"] for kwargs in probes if "device" in kwargs] == [torch.device("cpu")]
    assert reads == {True: 1, False: 1}  # the training split once, the test split once


# --- in a notebook ---------------------------------------------------------------------------

def test_the_cells_run_in_order_in_a_notebook_and_train_with_the_defaults(tmp_path, monkeypatch):
    """As Jupyter would: each "# %%" cell in turn, in one fresh namespace, with the kernel's
    own flags in sys.argv, twice. The defaults hold 5,000 digits out, so the data is larger."""
    write_mnist(tmp_path / "data", train_size=5_300)
    monkeypatch.chdir(tmp_path)  # the defaults: data/ and outputs/ in the current folder
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same numbers on any
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # machine: the CPU
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/dist-packages/ipykernel_launcher.py",
                                      "-f", "/root/.local/share/jupyter/runtime/kernel-1.json"])
    monkeypatch.setitem(sys.modules, "ipykernel", Mock())
    cells = re.split(r"^(?=# %%)", SOURCE, flags=re.MULTILINE)
    assert len(cells) >= 15 and cells[-1].strip().endswith("main()")
    namespace = {"__name__": "__main__"}
    histories = []
    for _ in range(2):  # a student runs the notebook again, in the same kernel
        for cell in cells:
            exec(compile(cell, "mnist.py", "exec"), namespace)
            if "plot_grid" in namespace:  # as small_grids does, in the notebook's namespace
                namespace["plot_grid"] = lambda *args, **kwargs: plt.figure(figsize=(1, 1))
        metrics = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
        histories.append([row["train_loss"] for row in metrics["history"]])
    assert histories[0] == histories[1] and len(histories[0]) == 10
    assert metrics["settings"]["epochs"] == 10 and metrics["settings"]["validation_size"] == 5000
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == sorted(REPORTS)
    assert len(plt.get_fignums()) == 2 * 5  # left open: the notebook shows them, then closes them
    plt.close("all")


@pytest.mark.parametrize("argv, in_kernel, flags", [
    (["ipykernel_launcher.py", "-f", "/tmp/kernel-9.json"], True, []),  # Jupyter
    (["/x/ipykernel_launcher.py", "--f=/tmp/kernel-v2.json"], True, []),  # VS Code
    (["/usr/local/colab_kernel_launcher.py", "-f", "/tmp/k.json"], True, []),  # Colab
    (["mnist.py", "--epochs", "3"], True, ["--epochs", "3"]),  # %run mnist.py --epochs 3
    (["mnist.py", "--epochs", "3", "-f"], False, ["--epochs", "3", "-f"]),  # a shell: -f is bad
])
def test_command_line_flags_ignore_only_a_notebook_kernels_own(monkeypatch, argv, in_kernel,
                                                               flags):
    monkeypatch.setattr(sys, "argv", argv)
    if in_kernel:
        monkeypatch.setitem(sys.modules, "ipykernel", Mock())
    else:
        monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert mnist.command_line_flags() == flags


def test_main_in_a_notebook_keeps_its_figures_open_and_elsewhere_closes_them(trained, tmp_path,
                                                                             monkeypatch):
    """In a kernel the new figures stay open, so they show below the cell; outside one they are
    closed. Either way the caller's own figure is left alone."""
    output_dir, _ = trained
    mine = plt.figure()
    monkeypatch.setitem(sys.modules, "ipykernel", Mock())
    argv = ["--predict", str(tmp_path / "seven.png"), "--output-dir", str(output_dir)]
    draw_seven().save(tmp_path / "seven.png")
    mnist.main(argv)
    assert len(plt.get_fignums()) == 2
    plt.close(plt.get_fignums()[-1])
    monkeypatch.delitem(sys.modules, "ipykernel")
    mnist.main(argv)
    assert plt.get_fignums() == [mine.number]
    plt.close("all")


# --- your own handwriting ----------------------------------------------------------------------

def test_prepare_digit_reads_ink_the_same_whatever_the_colours_or_transparency():
    on_paper = mnist.prepare_digit(draw_seven())
    white_on_black = mnist.prepare_digit(draw_seven(ink=(255,) * 4, paper=(0, 0, 0, 255)).convert(
        "L"))
    on_transparent = mnist.prepare_digit(draw_seven(paper=(255, 255, 255, 0)))
    for other in (white_on_black, on_transparent):
        assert (other - on_paper).abs().max() < 0.1


@pytest.mark.parametrize("digit", range(10))
def test_a_speck_near_a_corner_leaves_the_digit_as_it_was(digit):
    """A printed digit photographed on a light page, and again with a dot of dust 6 x 6 pixels
    near a corner: the box of all the ink would take the dot in and shrink the digit."""
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" /
                                  "DejaVuSans.ttf"), 150)
    page = Image.new("RGB", (300, 300), (225, 220, 210))
    ImageDraw.Draw(page).text((40 + 30 * (digit % 3), 60), str(digit), fill=(30, 30, 40),
                              font=font)
    specked = page.copy()
    ImageDraw.Draw(specked).rectangle([270, 270, 275, 275], fill=(30, 30, 40))
    clean = mnist.prepare_digit(page)
    assert (mnist.prepare_digit(specked) - clean).abs().max() < 0.02


def test_a_separate_stroke_with_a_tenth_of_the_ink_is_part_of_the_digit():
    """A 5 whose top bar does not touch its body, as many hands write it, keeps its bar; a dot
    with less than a tenth of the body's ink does not count."""
    image = Image.new("L", (200, 200), 255)
    draw = ImageDraw.Draw(image)
    draw.arc([40, 80, 140, 180], start=-150, end=150, fill=0, width=10)  # the body
    draw.line([(50, 40), (130, 40)], fill=0, width=10)  # the top bar, apart: 30% of the ink
    body = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(body).arc([40, 80, 140, 180], start=-150, end=150, fill=0, width=10)
    assert (mnist.prepare_digit(image) - mnist.prepare_digit(body)).abs().max() > 0.5
    dotted = image.copy()
    ImageDraw.Draw(dotted).ellipse([180, 180, 185, 185], fill=0)
    assert torch.equal(mnist.prepare_digit(dotted), mnist.prepare_digit(image))


@pytest.mark.parametrize("colour", [255, 0, 128])
def test_prepare_digit_refuses_an_image_with_no_ink(colour):
    with pytest.raises(ValueError, match="blank.png has no ink to read"):
        mnist.prepare_digit(Image.new("L", (50, 60), colour), name="blank.png")


def test_predict_prints_one_line_per_image_and_draws_them(trained, tmp_path, capsys,
                                                          monkeypatch):
    output_dir, folder = trained
    drawn, plot_grid = [], mnist.plot_grid
    monkeypatch.setattr(mnist, "plot_grid", lambda images, titles, *args, **kwargs: drawn.append(
        (images, titles)) or plot_grid(images, titles, *args, **kwargs))
    single = tmp_path / "single.png"
    draw_seven(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)).save(single)
    predicted, confidences = mnist.main(["--predict", str(single), str(folder), "--output-dir",
                                         str(output_dir)])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    paths = [single, folder / "a-seven.jpg", folder / "b-seven.png"]  # a folder: sorted images
    assert len(lines) == 3 and len(predicted) == 3 and predicted.dtype == torch.int64
    assert (confidences >= 0.1).all()  # the surest of ten probabilities is at least 0.1
    for line, path, digit, confidence in zip(lines, paths, predicted, confidences):
        assert line == f"{path}: {digit} ({confidence:.1%})"
    assert captured.err == f"wrote {output_dir / 'predictions.png'}\n"
    images, titles = drawn[0]  # predictions.png: each digit as the network saw it, under its line
    assert titles == [f"{path.stem}\n{digit} ({confidence:.1%})" for path, digit, confidence in
                      zip(paths, predicted, confidences)]
    assert all(torch.equal(image, mnist.read_digit(path)) for image, path in zip(images, paths))
    with Image.open(output_dir / "predictions.png") as image:
        assert image.format == "PNG" and image.width > 300


def test_predict_turns_a_photo_upright_and_reads_upper_case_suffixes(trained, tmp_path, capsys):
    output_dir, _ = trained
    folder = tmp_path / "phone"
    folder.mkdir()
    upright = draw_seven().convert("RGB")
    # A phone stores the photo as its sensor saw it, turned, with an EXIF note (orientation 6:
    # turn it 90 degrees clockwise to show it).
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.rotate(90, expand=True).save(folder / "PHOTO.JPG", exif=exif, quality=95)
    digit = mnist.read_digit(folder / "PHOTO.JPG")
    assert (digit - mnist.prepare_digit(upright)).abs().max() < 0.15
    assert (mnist.prepare_digit(upright.rotate(90, expand=True)) - digit).abs().max() > 0.5
    predicted, _ = mnist.main(["--predict", str(folder), "--output-dir", str(output_dir)])
    assert capsys.readouterr().out.startswith(f"{folder / 'PHOTO.JPG'}: ") and len(predicted) == 1


def test_prepare_digit_keeps_a_digit_already_20_pixels_tall_pixel_for_pixel():
    """Ink whose box is exactly 20 x 12 needs no scaling: it must come out unchanged, all of it."""
    ink = np.zeros((20, 12), dtype=np.uint8)
    ink[0, :], ink[:, 11], ink[19, 5:] = 255, 255, 255  # a square-cornered 7 with a foot
    canvas = np.zeros((50, 60), dtype=np.uint8)
    canvas[7:27, 30:42] = ink
    digit = mnist.prepare_digit(Image.fromarray(canvas)).numpy()
    rows, columns = np.nonzero(digit)
    assert np.array_equal(digit[rows.min():rows.max() + 1, columns.min():columns.max() + 1],
                          ink / 255)


def test_prepare_digit_scales_the_ink_to_20_pixels_and_centres_its_mass_not_its_box():
    """A lopsided 7: a heavy bar on top and a thin leg, drawn off-centre on light paper."""
    image = Image.new("L", (240, 220), 230)
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 10, 150, 30], fill=10)
    draw.line([(145, 30), (140, 110)], fill=10, width=6)
    digit = mnist.prepare_digit(image)
    assert digit.shape == (28, 28) and digit.dtype == torch.float32
    assert digit.min() >= 0 and digit.max() == pytest.approx(1, abs=0.05)
    assert digit[0].max() == 0 and digit[:, -1].max() == 0  # background is 0, as in MNIST
    (row, column), side = ink_centre_and_box(digit)  # where MNIST has its centre, and 20 tall
    assert abs(row - 14) <= 0.5 and abs(column - 14) <= 0.5 and abs(side - 20) <= 1
    rows = np.nonzero(digit.numpy().sum(axis=1) > 0.05)[0]
    assert (rows.min() + rows.max()) / 2 > 17  # the box's own middle lies well below the mass's


def test_a_one_pixel_wide_1_stays_one_pixel_wide_and_20_tall():
    image = Image.new("L", (60, 200), 255)
    ImageDraw.Draw(image).line([(30, 20), (30, 180)], fill=0, width=1)
    digit = mnist.prepare_digit(image)
    rows, columns = np.nonzero(digit.numpy() > 0.3)
    assert set(columns.tolist()) == {14} and rows.max() - rows.min() + 1 == 20
    assert abs((digit.sum(dim=1) * torch.arange(28)).sum() / digit.sum() - 14) <= 0.5
    dash = mnist.prepare_digit(image.transpose(Image.Transpose.ROTATE_90))  # lying down, as a -
    rows, columns = np.nonzero(dash.numpy() > 0.3)
    assert set(rows.tolist()) == {14} and columns.max() - columns.min() + 1 == 20


def test_faint_strokes_count_as_ink_in_the_box():
    """A 7 whose leg is drawn at 45 % of the bar's contrast: the leg is ink (over 0.3), so the
    box is the whole 7, 150 pixels tall, and scaling it to 20 leaves the 90-pixel bar about 12
    wide. Were the leg left out, the bar alone would be scaled to 20 wide."""
    image = Image.new("L", (240, 220), 255)
    ImageDraw.Draw(image).line([(40, 30), (130, 30)], fill=0, width=12)
    ImageDraw.Draw(image).line([(130, 30), (75, 180)], fill=round(255 * 0.55), width=12)
    _, columns = np.nonzero(mnist.prepare_digit(image).numpy() > 0.5)  # the bar, at full ink
    assert 10 <= columns.max() - columns.min() + 1 <= 14


def test_a_lopsided_digit_cropped_by_the_field_is_still_28_by_28():
    """A heavy blob with a long thin tail: centring the mass pushes the tail off the field."""
    image = Image.new("L", (600, 200), 255)
    ImageDraw.Draw(image).rectangle([0, 0, 150, 199], fill=0)
    ImageDraw.Draw(image).line([(150, 100), (599, 100)], fill=0, width=20)
    digit = mnist.prepare_digit(image)
    assert digit.shape == (28, 28) and abs(ink_centre_and_box(digit)[0][0] - 14) <= 0.5
    assert digit[:, -1].max() > 0.3 and digit[:, :8].max() == 0  # cut at the right, not wrapped


@pytest.mark.parametrize("ink, paper", [(20, 235), (235, 20)])  # dark on light, and light on dark
def test_a_16_bit_grey_image_reads_like_its_8_bit_version(tmp_path, ink, paper):
    eight_bit = draw_seven(ink=(ink,) * 3 + (255,), paper=(paper,) * 3 + (255,)).convert("L")
    ImageDraw.Draw(eight_bit).line([(150, 150), (250, 150)], fill=(ink + paper) // 2, width=6)
    sixteen_bit = Image.fromarray(np.asarray(eight_bit).astype(np.uint16) * 257)  # 0-65535
    sixteen_bit.save(tmp_path / "scan.png")
    with Image.open(tmp_path / "scan.png") as reopened:  # as a scanner's file opens: I;16 or I
        assert reopened.mode.startswith("I")
    assert torch.equal(mnist.read_digit(tmp_path / "scan.png"), mnist.prepare_digit(eight_bit))


def test_odd_images_read_like_the_plain_digit_they_show(trained, tmp_path, capsys):
    """Palette, grey with alpha, and a transparent colour key, in each mode that has one; ink at
    15 % contrast: each is prepared like the plain image, and --predict reads them all."""
    output_dir, _ = trained
    cases = odd_images(tmp_path / "odd")
    for name, (path, reference) in cases.items():
        with Image.open(path) as image:
            assert name != "keyed-rgb.png" or "transparency" in image.info
        difference = (mnist.read_digit(path) - mnist.prepare_digit(reference)).abs().max()
        assert difference < 0.1, name
    predicted, _ = mnist.main(["--predict", str(tmp_path / "odd"), "--output-dir",
                               str(output_dir), "--device", "cpu"])
    assert len(predicted) == len(cases) == len(capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("contrast, reads", [(0.05, False), (0.15, True)])
def test_ink_below_a_tenth_of_the_contrast_is_no_ink(trained, tmp_path, capsys, contrast, reads):
    """Ink at 5 % of the full contrast is too faint: the one-line error. At 15 %, it reads."""
    output_dir, _ = trained
    image = Image.new("L", (300, 220), 200)
    ImageDraw.Draw(image).line([(40, 30), (130, 30), (75, 180)], fill=200 - round(255 * contrast),
                               width=14)
    image.save(tmp_path / "faint.png")
    argv = ["--predict", str(tmp_path / "faint.png"), "--output-dir", str(output_dir)]
    if reads:
        assert len(mnist.main(argv)[0]) == 1
    else:
        code, message = fail(argv, capsys)
        assert code == 2 and "faint.png has no ink to read" in message


@pytest.mark.parametrize("case", ["missing", "not an image", "cut short", "no ink", "empty folder"])
def test_predict_refuses_bad_images_in_one_line_and_changes_nothing(trained, tmp_path, capsys,
                                                                    case):
    output_dir, folder = trained
    path, words = broken_inputs(tmp_path / "bad")[case]
    before = snapshot(output_dir)
    # A good image first: nothing at all may be predicted when a later one is bad.
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--predict", str(folder / "b-seven.png"), str(path), "--output-dir",
                    str(output_dir)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"{path} " in captured.err and words in captured.err
    assert snapshot(output_dir) == before


# --- the trained model: saved on any device, read on any machine -----------------------------

def test_a_model_trained_on_a_gpu_is_saved_with_cpu_tensors(data_dir, tmp_path, monkeypatch):
    """A GPU's weights stood in for (OnAGpu): model.pt must hold plain CPU tensors, which
    torch.load reads where torch sees no GPU."""
    train_model = mnist.train_model

    def trained_on_a_gpu(**settings):
        model, metrics = train_model(**settings)
        weights = model.state_dict()
        model.state_dict = lambda: {key: value.as_subclass(OnAGpu) for key, value in
                                    weights.items()}
        return model, metrics
    monkeypatch.setattr(mnist, "train_model", functools.wraps(train_model)(trained_on_a_gpu))
    monkeypatch.setattr(mnist, "draw_reports", lambda *args: {})
    with contextlib.redirect_stdout(io.StringIO()):
        mnist.main(args_for(data_dir, tmp_path / "out", "--epochs", "1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    saved = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert all(type(value) is torch.Tensor and value.device.type == "cpu"
               for value in saved["weights"].values())
    draw_seven().save(tmp_path / "seven.png")
    predicted, _ = mnist.main(["--predict", str(tmp_path / "seven.png"), "--output-dir",
                               str(tmp_path / "out")])
    assert len(predicted) == 1


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # torch, indexing a tensor
@pytest.mark.parametrize("damage", [
    lambda path: path.unlink(), lambda path: path.write_bytes(b"garbage"),
    lambda path: path.write_bytes(path.read_bytes()[:1000]),  # cut short
    *[lambda path, content=content: torch.save(content, path) for content in [
        mnist.MLP().state_dict(), torch.zeros(3), [1, 2, 3], 7, None, "weights",
        {"weights": nn.Linear(784, 10).state_dict(), "mean": 0.1, "std": 0.3},
        {"weights": mnist.MLP().state_dict(), "mean": "not a number", "std": 0.3},
        {"weights": mnist.MLP().state_dict(), "mean": 0.1}, {"weights": 5, "mean": 0.1,
                                                             "std": 0.3},
        {"weights": mnist.MLP().state_dict(), "mean": 0.1, "std": 0.3, "code": nn.Identity()}]]],
    ids=["missing", "garbage", "cut short", "weights alone", "a tensor", "a list", "a number",
         "None", "a string", "another network", "a bad mean", "no std", "weights a number",
         "an object, which could run code"])
def test_predict_without_this_networks_model_says_what_to_do(trained, capsys, damage):
    output_dir, folder = trained
    damage(output_dir / "model.pt")
    before = snapshot(output_dir)
    code, message = fail(["--predict", str(folder), "--output-dir", str(output_dir)], capsys)
    assert code == 2 and str(output_dir) in message and snapshot(output_dir) == before
    assert ("train one first with 'python mnist.py'" if not (output_dir / "model.pt").exists()
            else "does not hold this script's network") in message


def test_a_model_pt_that_cannot_be_read_gets_the_one_line_error(trained, monkeypatch, capsys):
    output_dir, folder = trained
    monkeypatch.setattr(torch, "load", Mock(side_effect=PermissionError(13, "Permission denied")))
    code, message = fail(["--predict", str(folder), "--output-dir", str(output_dir)], capsys)
    assert code == 2 and f"{output_dir / 'model.pt'} does not hold this script's" in message


# --- bad data: one clear line, and a non-zero exit -------------------------------------------

def test_download_failure_says_where_to_put_which_files(tmp_path, offline, previous_outputs,
                                                        capsys):
    output_dir, before = previous_outputs
    code, message = fail(args_for(tmp_path / "nothing-here", output_dir), capsys)
    assert code == 1 and snapshot(output_dir) == before
    # torchvision's own reason (since 0.18 with the network's error; 0.17 prints that above)
    assert "could not load MNIST (Error downloading train-images-idx3-ubyte.gz" in message
    assert str((tmp_path / "nothing-here" / "MNIST" / "raw").resolve()) in message
    for name in MNIST_FILES:
        assert name in message
    assert "(.gz) or unpacked" in message and "--data-dir" in message


@pytest.mark.parametrize("files, words", [
    (MNIST_FILES[:2], "could not load MNIST (Error downloading"),
    ("dotted", "Rename train-images.idx3-ubyte: a hyphen, not a dot"),  # a file manager's
    ("bad checksum", "Error downloading train-images-idx3-ubyte.gz"),
])
def test_files_missing_misnamed_or_damaged_get_the_same_advice(tmp_path, offline, capsys, files,
                                                               words):
    raw = write_mnist(tmp_path / "data", names=MNIST_FILES[1:] if files == "bad checksum" else
                      MNIST_FILES if files == "dotted" else files)
    if files == "dotted":
        (raw / "train-images-idx3-ubyte").rename(raw / "train-images.idx3-ubyte")
    if files == "bad checksum":
        (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"not MNIST"))
    code, message = fail(args_for(tmp_path / "data", tmp_path / "out"), capsys)
    assert code == 1 and words in message and str(raw.resolve()) in message
    assert all(name in message for name in MNIST_FILES)


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # an unpack cut short
    lambda data: data[:6],
    lambda data: struct.pack(">I", 1234) + data[4:],  # not an IDX file's magic number
    lambda data: struct.pack(">4I", 0x0D03, TEST_SIZE, 28, 28) + bytes(TEST_SIZE * 3136),  # floats
])
def test_a_damaged_unpacked_file_ends_in_one_line_that_names_the_folder(
        data_dir, previous_outputs, capsys, damage):
    output_dir, before = previous_outputs
    path = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    code, message = fail(args_for(data_dir, output_dir), capsys)
    assert code == 1 and snapshot(output_dir) == before
    assert str(path.parent.resolve()) in message
    assert "delete a file there that is damaged" in message


@pytest.mark.parametrize("name, array, words", [
    ("t10k-images-idx3-ubyte", np.zeros((TEST_SIZE, 27, 27)), "100 t10k images of 27 x 27"),
    ("train-labels-idx1-ubyte", np.zeros(TRAIN_SIZE - 1), "300 train images of 28 x 28 pixels "
                                                          "and 299 labels"),
    ("t10k-labels-idx1-ubyte", np.full(TEST_SIZE, 12), "100 labels [12]"),
])
def test_files_that_are_not_mnists_end_in_one_line(data_dir, tmp_path, capsys, name, array,
                                                   words):
    write_idx(data_dir / "MNIST" / "raw" / name, array)
    code, message = fail(args_for(data_dir, tmp_path / "out"), capsys)
    assert code == 2 and words in message and str((data_dir / "MNIST" / "raw").resolve()) in message
    assert f"Delete its {name.split('-')[0]}-* files and run again" in message


def test_data_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("not a folder")
    code, message = fail(args_for(tmp_path / "data.txt", tmp_path / "out"), capsys)
    assert code == 1 and "Not a directory" in message and "--data-dir" in message


@pytest.mark.parametrize("size", [str(TRAIN_SIZE), "-1"])
def test_a_validation_set_of_all_the_data_or_less_than_none(data_dir, previous_outputs, capsys,
                                                            size):
    output_dir, before = previous_outputs
    code, message = fail(args_for(data_dir, output_dir, "--validation-size", size), capsys)
    assert code == 2 and f"validation_size must be 0 to 299, not {size}" in message
    assert "choose another --validation-size" in message and snapshot(output_dir) == before


def test_an_error_that_is_not_the_users_keeps_its_traceback(data_dir, tmp_path, monkeypatch):
    def out_of_memory(**settings):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(mnist, "train_model", functools.wraps(mnist.train_model)(out_of_memory))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        mnist.main(args_for(data_dir, tmp_path / "out"))


# --- bad flags -------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, words", [
    ("--epochs", "0", "must be a whole number from 1 to 10**9, not '0'"),
    ("--epochs", str(10**30), "must be a whole number from 1 to"),  # would overflow in torch
    ("--batch-size", "0", "must be a whole number from 1 to"),
    ("--seed", str(2**64), "must be a whole number from 0 to 2**64 - 1"),
    ("--seed", "-1", "must be a whole number from 0"),
    ("--lr", "0", "positive finite number"),
    ("--lr", "-0.1", "positive finite number"),
    ("--lr", "nan", "positive finite number"),
    ("--lr", "1e400", "positive finite number"),
    ("--lr", "fast", "must be a positive finite number, not 'fast'"),
    ("--validation-size", "5k", "invalid int value: '5k'"),
    ("--max-shift", "9", "invalid choice"),
    ("--dropout", "1", "must be at least 0 and below 1"),
    ("--dropout", "nan", "must be at least 0 and below 1"),
    ("--device", "tpu", "invalid choice: 'tpu'"),
    ("--epoch", "3", "unrecognized arguments"),  # a typo, not an abbreviation of --epochs
])
def test_bad_flags_get_one_line_and_exit_code_2(tmp_path, capsys, flag, value, words):
    code, message = fail(args_for(tmp_path, tmp_path / "out", flag, value), capsys)
    assert code == 2 and flag in message and words in message


def test_the_largest_seed_is_accepted(data_dir):
    assert mnist.parse_args(["--seed", str(2**64 - 1)]).seed == 2**64 - 1 == quiet_train(
        data_dir, seed=2**64 - 1, dry_run=True)[1]["settings"]["seed"]


def test_output_dir_that_is_a_file_or_cannot_be_created(data_dir, tmp_path, capsys):
    (tmp_path / "outputs").write_text("a file")
    code, message = fail(args_for(data_dir, tmp_path / "outputs"), capsys)
    assert code == 2 and f"cannot write to --output-dir {tmp_path / 'outputs'}" in message
    code, message = fail(args_for(data_dir, tmp_path / "outputs" / "below-a-file"), capsys)
    assert code == 2 and "cannot write to --output-dir" in message


# --- devices: GPUs missing, broken, or named ---------------------------------------------------

@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_auto_skips_a_gpu_that_torch_reports_but_cannot_use(broken_gpu, capsys, kind):
    broken_gpu(kind)
    assert mnist.device_or_error("auto") == torch.device("cpu")
    assert capsys.readouterr().err == (
        f"the {kind} device failed a test step (CUDA error: no kernel image is "
        "available for execution on the device); the run continues on the CPU\n")


def test_a_dry_run_on_auto_with_a_broken_gpu_trains_on_the_cpu(broken_gpu, data_dir, tmp_path,
                                                               capsys, monkeypatch):
    """--dry-run with a batch larger than the data, too: 1 epoch of 1 step."""
    broken_gpu("cuda")
    small_grids(monkeypatch)
    metrics = mnist.main(args_for(data_dir, tmp_path / "out", "--device", "auto", "--dry-run",
                                  "--batch-size", "100000"))
    assert metrics["settings"]["device"] == "cpu"
    assert "continues on the CPU" in capsys.readouterr().err
    assert len(metrics["history"]) == 1 and len(metrics["learning_rates"]) == 1
    assert sum(map(sum, metrics["confusion_matrix"])) == TEST_SIZE
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(REPORTS)


BUILDS = {  # what differs between the torch builds that students install
    "CUDA": ("12.8", None, False, "built for CUDA 12.8"),
    "ROCm": (None, "6.4.1", False, "built for ROCm 6.4.1"),
    "macOS": (None, None, True, "built for Apple's MPS"),
    "CPU only": (None, None, False, "CPU-only"),
}


@pytest.fixture(params=BUILDS)
def build(request, monkeypatch):
    """A simulated torch build; returns how the error must name it."""
    cuda, hip, mps_built, words = BUILDS[request.param]
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: mps_built)
    return words


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_a_gpu_asked_for_by_name_that_fails_ends_in_one_line(broken_gpu, build, data_dir,
                                                             tmp_path, capsys, kind):
    broken_gpu(kind)
    code, message = fail(args_for(data_dir, tmp_path / "out", "--device", kind), capsys)
    assert code == 2
    assert f"--device {kind} was asked for, but CUDA error: no kernel image" in message
    assert f"torch {torch.__version__}, {build}). Use --device cpu" in message


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_missing_gpu_asked_for_by_name_names_the_build_and_suggests_cpu(build, monkeypatch,
                                                                          tmp_path, capsys,
                                                                          device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, message = fail(args_for(tmp_path, tmp_path / "out", "--device", device), capsys)
    assert code == 2 and f"--device {device} was asked for, but torch finds no {device} " \
        f"device here (torch {torch.__version__}, {build}). Use --device cpu" in message
    assert mnist.device_or_error("auto") == torch.device("cpu") and capsys.readouterr().err == ""


def test_the_test_step_really_runs_on_the_device(monkeypatch, capsys):
    """Without a broken torch.ones: this machine's torch has no usable MPS, so the step fails."""
    if torch.backends.mps.is_available():
        pytest.skip("this machine has a working MPS device")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mnist.device_or_error("auto") == torch.device("cpu")
    message = capsys.readouterr().err
    assert message.startswith("the mps device failed a test step (")
    assert message.count("\n") == 1 and len(message) < 300


def test_a_device_can_be_named_with_its_index_or_given_as_a_torch_device(monkeypatch, data_dir):
    """"cuda:0" where torch has CUDA (simulated: a test step that succeeds anywhere), and a
    torch.device: each is used as given, where "auto" picks by what torch finds."""
    assert mnist.pick_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *size, device=None: ones(*size))
    assert mnist.device_or_error("cuda:0") == torch.device("cuda", 0)
    assert mnist.pick_device("auto") == torch.device("cuda")
    monkeypatch.undo()
    _, metrics = quiet_train(data_dir, device=torch.device("cpu"), dry_run=True)
    assert metrics["settings"]["device"] == "cpu"


def test_predict_uses_the_device_asked_for(trained, monkeypatch):
    """A stand-in device, "meta" (shapes without numbers), shows where the model was sent."""
    output_dir, folder = trained
    asked, used, predict = [], [], mnist.predict
    monkeypatch.setattr(mnist, "device_or_error",
                        lambda name: asked.append(name) or torch.device("meta"))

    def predict_on_the_cpu(model, *args):
        used.append(next(model.parameters()).device.type)
        return predict(mnist.load_trained_model(output_dir)[0], *args)
    monkeypatch.setattr(mnist, "predict", predict_on_the_cpu)
    mnist.main(["--predict", str(folder), "--output-dir", str(output_dir), "--device", "mps"])
    assert asked == ["mps"] and used == ["meta"]


# --- failures and Ctrl-C: no report is ever half-written -------------------------------------

def test_a_diverging_loss_stops_with_advice_and_writes_nothing(data_dir, previous_outputs, capsys):
    output_dir, before = previous_outputs
    code, message = fail(args_for(data_dir, output_dir, "--lr", "1e6"), capsys)
    assert code == 1 and "in epoch 1" in message
    assert "training has diverged" in message and "smaller --lr" in message
    assert snapshot(output_dir) == before


def test_ctrl_c_during_training_exits_130_and_keeps_old_files(data_dir, previous_outputs,
                                                              monkeypatch, capsys):
    output_dir, before = previous_outputs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(mnist, "train_one_epoch", interrupt)
    code, message = fail(args_for(data_dir, output_dir), capsys)
    assert code == 130 and "interrupted" in message and "each file" in message
    assert snapshot(output_dir) == before


@pytest.mark.parametrize("interrupted", ["a.png", "b.json", "c.pt"])
def test_a_write_interrupted_halfway_leaves_the_old_file_byte_for_byte(tmp_path, monkeypatch,
                                                                      interrupted):
    """Ctrl-C after half of a file is written: that report keeps its old bytes, the ones before
    it are new and whole, and no temporary file is left behind."""
    order = ["a.png", "b.json", "c.pt"]  # the order in which reports() lists them
    for name in order:
        (tmp_path / name).write_bytes(b"old " + name.encode())

    def half_then_ctrl_c(write):
        def writer(*args, **kwargs):
            path = next(arg for arg in args if isinstance(arg, (str, Path)))
            buffer = io.BytesIO()
            write(*[buffer if arg is path else arg for arg in args], **kwargs)
            Path(path).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            raise KeyboardInterrupt
        return writer

    if interrupted == "a.png":
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                            half_then_ctrl_c(matplotlib.figure.Figure.savefig))
    elif interrupted == "c.pt":
        monkeypatch.setattr(torch, "save", half_then_ctrl_c(torch.save))
    else:
        def half_a_text_then_ctrl_c(path, text, **kwargs):
            path.write_bytes(text.encode()[:len(text) // 2])
            raise KeyboardInterrupt
        monkeypatch.setattr(Path, "write_text", half_a_text_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        mnist.write_reports(tmp_path, reports())
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == order  # no temporary file left
    for name in order:
        content = (tmp_path / name).read_bytes()
        if order.index(name) >= order.index(interrupted):
            assert content == b"old " + name.encode()
        else:
            assert content != b"old " + name.encode()  # written before: whole and new
    if interrupted != "a.png":
        with Image.open(tmp_path / "a.png") as image:
            image.verify()
    if interrupted == "c.pt":
        assert json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
        # And once more, uninterrupted: each file new and whole, and no other file touched.
        (tmp_path / ".c.pt.old").write_bytes(b"left by a crash of an older version")
        mnist.write_reports(tmp_path, reports())
        assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["w"], torch.ones(2))
        assert (tmp_path / ".c.pt.old").read_bytes() == b"left by a crash of an older version"
    plt.close("all")


@pytest.mark.parametrize("refuse", ["writing the temporary file", "renaming it into place"])
def test_a_report_that_cannot_be_written_ends_in_one_line_that_names_it(trained, monkeypatch,
                                                                        capsys, refuse):
    """Windows refuses to replace a file that a viewer, OneDrive or a virus scan holds open."""
    output_dir, folder = trained
    before = snapshot(output_dir)

    def held_open(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    if refuse == "renaming it into place":
        monkeypatch.setattr(os, "replace", held_open)
    else:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", held_open)
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--predict", str(folder), "--output-dir", str(output_dir)])
    message = capsys.readouterr().err
    assert exit_info.value.code == 1 and message.count("\n") == 1
    assert f"cannot write {output_dir / 'predictions.png'} (Permission denied)" in message
    assert "if another program holds it open, close it and run again" in message
    assert snapshot(output_dir) == before  # nothing replaced, and no temporary file left


# --- where students run it: Windows consoles, no display ---------------------------------------

@pytest.mark.filterwarnings("ignore:Glyph")  # DejaVu Sans has no Chinese for the figure's title
def test_a_narrow_console_encoding_does_not_crash_printing(trained, tmp_path, monkeypatch):
    """Windows' cp1252 has no Chinese characters: they print as escapes instead."""
    output_dir, _ = trained
    path = tmp_path / "数字七.png"
    draw_seven().save(path)
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="cp1252"))
    mnist.main(["--predict", str(path), "--output-dir", str(output_dir)])
    console.flush()
    assert "\\u6570\\u5b57\\u4e03.png: " in console.buffer.getvalue().decode("cp1252")


@pytest.mark.parametrize("backend", ["agg", "module://matplotlib_inline.backend_inline"])
def test_show_says_when_no_window_can_open_and_else_shows(trained, monkeypatch, capsys, backend):
    """agg: no display, as over ssh; inline outside a kernel: Colab's `!python mnist.py`."""
    output_dir, folder = trained

    def no_show():
        raise AssertionError("plt.show() was called where no window can open")
    monkeypatch.setattr(plt, "show", no_show)
    monkeypatch.setattr(plt, "get_backend", lambda: backend)
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    mnist.main(["--predict", str(folder), "--output-dir", str(output_dir), "--show"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        f"--show: no window can open here (matplotlib's backend is {backend}); the figures are "
        f"PNG files in {output_dir}")
    assert len(captured.out.splitlines()) == 2  # stdout: one line per image, nothing else
    # With a display, the windows open, and Ctrl-C there exits 130.
    plt.close("all")
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(len(plt.get_fignums())))
    monkeypatch.setattr(plt, "get_backend", lambda: "QtAgg")
    mnist.main(["--predict", str(folder), "--output-dir", str(output_dir), "--show"])
    assert shown == [1] and plt.get_fignums() == []

    def interrupt():
        raise KeyboardInterrupt
    monkeypatch.setattr(plt, "show", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["--predict", str(folder), "--output-dir", str(output_dir), "--show"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.endswith(f"interrupted; each file in {output_dir} is whole, "
                                            "old or new\n")


# --- the edits students make -----------------------------------------------------------------

STUDENT_LAYERS = {  # README exercise 8's CNN, and other edits of MLP's layers that students make
    "cnn": """nn.Sequential(
            nn.Unflatten(1, (1, 28)),                                  # (B, 1, 28, 28)
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),           # (B, 32, 13, 13)
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),          # (B, 64, 5, 5)
            nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, 10))""",
    "deeper": """nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10))""",
    "batchnorm": """nn.Sequential(nn.Flatten(), nn.BatchNorm1d(784), nn.Linear(784, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))""",
    "logistic": "nn.Sequential(nn.Flatten(), nn.Linear(784, 10))",
}
LAYERS = SOURCE[SOURCE.index("nn.Sequential(\n            nn.Flatten(),"):
                SOURCE.index("\n        )\n") + len("\n        )")]


@pytest.mark.parametrize("name", STUDENT_LAYERS)
def test_a_students_own_layers_run_end_to_end_with_that_edit_alone(tmp_path, name, data_dir,
                                                                   capsys, monkeypatch):
    student = student_copy(tmp_path, name, LAYERS, STUDENT_LAYERS[name])
    small_grids(monkeypatch, student)  # first_layer.png and the rest follow the model
    metrics = student.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out"),
                            "--dry-run", "--device", "cpu", "--validation-size", "50"])
    output = capsys.readouterr().out
    parameters = {"cnn": 225_034, "deeper": 235_146, "batchnorm": 110_954, "logistic": 7_850}
    assert f"\nparameters: {parameters[name]:,}\n" in output  # the copy is the edit
    assert metrics["settings"]["epochs"] == 1 and len(metrics["history"]) == 1
    assert "Adam's first step" in output and "largest gradient" in output
    for report in REPORTS:
        assert (tmp_path / "out" / report).stat().st_size > 0
    with Image.open(tmp_path / "out" / "first_layer.png") as image:  # one tile per unit or filter
        assert image.size[1] < 400 if name in ("cnn", "logistic") else image.size[1] > 400
    draw_seven().save(tmp_path / "seven.png")
    predicted, _ = student.main(["--predict", str(tmp_path / "seven.png"), "--output-dir",
                                 str(tmp_path / "out"), "--device", "cpu"])
    assert len(predicted) == 1
    plt.close("all")


def test_exercise_2s_sgd_copy_traces_sgds_step(tmp_path, data_dir, capsys):
    """README exercise 2 swaps Adam for SGD with momentum in train_model, in a copy: the trace
    must show SGD's step, lr times the gradient, at the run's learning rate."""
    student = student_copy(tmp_path, "sgd", "optimizer = torch.optim.Adam(model.parameters(), "
                           "lr=lr)\n    trace_one_digit", "optimizer = torch.optim.SGD(model."
                           "parameters(), lr=lr, momentum=0.9)\n    trace_one_digit")
    student.train_model(epochs=2, batch_size=64, lr=0.1, validation_size=50, data_dir=data_dir,
                        device="cpu")
    output = capsys.readouterr().out
    gradient = float(re.search(r"largest gradient, (\S+):", output).group(1))
    step = re.search(r"  SGD's first step, at lr = 0.100000, moves it by (\S+) to", output)
    assert step and float(step.group(1)) == pytest.approx(-0.1 * gradient, abs=2e-6)
    plt.close("all")


def test_exercise_6s_broken_copy_shows_in_the_loss_before_training(tmp_path, data_dir, capsys):
    """README exercise 6 feeds raw pixels, 0 to 255: the check before training must show it."""
    student = student_copy(tmp_path, "broken", "pixels[name].sub_(mean).div_(std)",
                           "pixels[name].mul_(255)")
    student.train_model(dry_run=True, validation_size=50, data_dir=data_dir, device="cpu")
    loss = float(re.search(r"loss before training: (\S+)", capsys.readouterr().out).group(1))
    assert loss > 3 * math.log(10)


# --- helpers -----------------------------------------------------------------------------------

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


def write_mnist(data_dir, names=MNIST_FILES, train_size=TRAIN_SIZE, test_size=TEST_SIZE):
    """Write synthetic train and test splits as <data_dir>/MNIST/raw/<name>; return that folder."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_digits(train_size, seed=1)
    test_images, test_labels = synthetic_digits(test_size, seed=2)
    arrays = dict(zip(MNIST_FILES, (train_images, train_labels, test_images, test_labels)))
    for name in names:
        write_idx(raw / name, arrays[name])
    return raw


@pytest.fixture
def data_dir(tmp_path):
    write_mnist(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run the script once on synthetic data; several tests read what it wrote."""
    folder = tmp_path_factory.mktemp("run")
    write_mnist(folder / "data")
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as output:
        metrics = mnist.main(args_for(folder / "data", folder / "outputs"))
    assert 0 < metrics["seconds"] < time.perf_counter() - started  # the run's own time, no more
    return folder, metrics, output.getvalue()


@pytest.fixture
def trained(finished_run, tmp_path):
    """A copy of a finished run's outputs, and a folder of two images of digits."""
    folder, _, _ = finished_run
    shutil.copytree(folder / "outputs", tmp_path / "outputs")
    (tmp_path / "digits").mkdir()
    draw_seven().save(tmp_path / "digits" / "b-seven.png")
    draw_seven().convert("RGB").save(tmp_path / "digits" / "a-seven.jpg")
    (tmp_path / "digits" / "notes.txt").write_text("not an image, and not an image file name")
    (tmp_path / "digits" / "scan.pdf").write_bytes(b"%PDF-1.4 Pillow can save PDFs, not open them")
    # What macOS leaves on exFAT and network drives: hidden files, skipped, not refused.
    (tmp_path / "digits" / "._b-seven.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "digits" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return tmp_path / "outputs", tmp_path / "digits"


@pytest.fixture
def previous_outputs(finished_run, tmp_path):
    """A copy of a finished run's outputs, to check that a failed run leaves them untouched."""
    folder, _, _ = finished_run
    shutil.copytree(folder / "outputs", tmp_path / "outputs")
    return tmp_path / "outputs", snapshot(tmp_path / "outputs")


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail the way it does with no network."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.fixture
def broken_gpu(monkeypatch):
    """While the device is tested, torch reports a GPU of `kind` whose first kernel fails, as on
    a GPU too old for the installed build. (Afterwards torch sees the real machine again.)"""
    def ones_that_fail_off_the_cpu(*size, device=None, **kwargs):
        if torch.device(device or "cpu").type != "cpu":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the "
                               "device\nCUDA kernel errors might be asynchronously reported")
        return ones(*size, device=device, **kwargs)
    ones, device_or_error = torch.ones, mnist.device_or_error

    def report(kind):
        def test_with_a_broken_gpu(name):
            with monkeypatch.context() as patch:
                patch.setattr(torch.cuda, "is_available", lambda: kind == "cuda")
                patch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")
                patch.setattr(torch, "ones", ones_that_fail_off_the_cpu)
                return device_or_error(name)
        monkeypatch.setattr(mnist, "device_or_error", test_with_a_broken_gpu)
    return report


class OnAGpu(torch.Tensor):
    """A CPU tensor that says it is on a GPU, as a GPU-trained model's weights are; .cpu(), as
    for them, gives a plain tensor on the CPU. torch.load(..., weights_only=True) refuses it."""
    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


class FixedAnswers(nn.Module):
    """A stand-in model that answers each digit with the logits stored in its first pixel row."""
    def forward(self, images):
        return images[:, 0, :10]


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
            "--batch-size", "64", "--device", "cpu", "--validation-size", str(VALIDATION_SIZE),
            *extra]


def quiet_train(data_dir, **settings):
    """train_model on the synthetic data on the CPU, printing nothing: (model, metrics)."""
    settings = {"epochs": 2, "batch_size": 64, "validation_size": VALIDATION_SIZE, "device": "cpu",
                **settings}
    with contextlib.redirect_stdout(io.StringIO()):
        return mnist.train_model(data_dir=data_dir, **settings)


def replay_schedule(schedule, lr, steps):
    """Each step's (learning rate, Adam's beta1), read off the optimizer as it steps, and the
    rates that schedule_rates recorded."""
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    rates, seen = mnist.schedule_rates(optimizer, schedule, lr, steps), []
    for _ in range(steps):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        optimizer.step()  # with no gradient, a step changes nothing
    return seen, rates


def trace(model, optimizer, capsys):
    """trace_one_digit on a random digit labelled 3: (probabilities, (before, gradient, after),
    (unit, pixel), a copy of the model with its gradients, what it printed)."""
    image = torch.randn(28, 28, generator=torch.Generator().manual_seed(2))  # not the global's
    label = torch.tensor(3)
    probabilities, numbers = mnist.trace_one_digit(model, optimizer, image, label)
    output = capsys.readouterr().out
    unit, pixel = map(int, re.search(r"unit (\d+)'s weight for pixel (\d+)", output).groups())
    reference = copy.deepcopy(model).eval()
    F.cross_entropy(reference(image[None]), label[None]).backward()
    return probabilities, numbers, (unit, pixel), reference, output


def where_the_dot_went(images):
    """(row, column) of each image's brightest pixel."""
    return [divmod(where, 28) for where in images.flatten(1).argmax(dim=1).tolist()]


def small_grids(monkeypatch, module=mnist):
    """Grids of digits drawn as a blank 1 x 1 inch figure: the same for every model and every
    setting, and a third of a second each, so that tests of other things stay quick."""
    monkeypatch.setattr(module, "plot_grid", lambda *args, **kwargs: plt.figure(figsize=(1, 1)))


def snapshot(folder):  # each file's bytes, by name
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def ink_centre_and_box(digit):
    """(row, column) centre of mass of a 28 x 28 digit, and the longer side of its ink box."""
    digit, (rows, columns) = digit.numpy(), np.nonzero(digit.numpy() > 0.05)
    centre = [(digit.sum(axis=axis) * np.arange(28)).sum() / digit.sum() for axis in (1, 0)]
    return centre, max(np.ptp(rows) + 1, np.ptp(columns) + 1)


def draw_seven(size=(300, 220), at=(40, 30), ink=(20, 20, 30, 255), paper=(235, 230, 220, 255)):
    """A thick "7" drawn off-centre on a large canvas, as a photo or a paint program gives it."""
    image = Image.new("RGBA", size, paper)
    x, y = at
    ImageDraw.Draw(image).line([(x, y), (x + 90, y), (x + 35, y + 150)], fill=ink, width=14)
    return image


def broken_inputs(folder):
    (folder / "empty").mkdir(parents=True)
    (folder / "empty" / "notes.txt").write_text("a folder with no image in it")
    Image.new("RGB", (40, 40), (250, 250, 250)).save(folder / "blank.png")
    (folder / "fake.png").write_bytes(b"this is text, not a PNG")
    draw_seven().convert("RGB").save(folder / "whole.jpg")
    (folder / "cut.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:600])
    return {
        "missing": (folder / "nowhere.png", "does not exist"),
        "not an image": (folder / "fake.png", "is not an image that Pillow can read"),
        "cut short": (folder / "cut.jpg", "is not an image that Pillow can read"),
        "no ink": (folder / "blank.png", "has no ink to read"),
        "empty folder": (folder / "empty", "a folder with no image files"),
    }


def odd_images(folder):
    """Images that paint programs, scanners and phones save, each with the plain seven that it
    should read like: {file name: (path, the plain image)}."""
    folder.mkdir()
    plain = draw_seven(paper=(255, 255, 255, 255)).convert("RGB")
    on_grey = draw_seven(paper=(200, 200, 200, 255)).convert("RGB")
    keyed = plain.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    keyed.info["transparency"] = keyed.getpixel((0, 0))  # the paper's colour: a key, not alpha
    faint = Image.new("L", (300, 220), 200)  # ink at 15 % of the full contrast
    ImageDraw.Draw(faint).line([(40, 30), (130, 30), (75, 180)], fill=162, width=14)
    cases = {"palette.png": (draw_seven().convert("RGB").convert("P"), plain),
             "la.png": (draw_seven(paper=(255, 255, 255, 0)).convert("LA"), plain),
             "keyed-palette.png": (keyed, plain),
             "keyed-rgb.png": (on_grey, on_grey),
             "keyed-grey.png": (on_grey.convert("L"), on_grey),
             "faint.png": (faint, plain)}
    for name, (image, _) in cases.items():
        options = {"transparency": (200, 200, 200) if name == "keyed-rgb.png" else 200} \
            if name in ("keyed-rgb.png", "keyed-grey.png") else {}
        image.save(folder / name, **options)
    return {name: (folder / name, reference) for name, (_, reference) in cases.items()}


def reports():
    figure = plt.figure(figsize=(2, 2))
    return {"a.png": figure, "b.json": {"x": 1}, "c.pt": {"w": torch.ones(2)}}


def student_copy(tmp_path, name, old, new):
    """A copy of mnist.py with one edit, as an exercise asks for, imported under its name."""
    assert SOURCE.count(old) == 1, old
    path = tmp_path / f"{name}.py"
    path.write_text(SOURCE.replace(old, new), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
