"""CI's end-to-end gate, run after `python mnist.py --epochs 10` on the real MNIST.

1. Every report file exists, and each figure is a PNG of its own size in pixels (a figure's size
   in inches at 100 dpi).
2. The test accuracy in metrics.json is at least 0.98 (--gate). The default recipe scores about
   0.984 (98.29 % was the worst of five seeds on one CPU); the original recipe, a run without
   shifts, and a run without model.train() score 0.981 or less.
3. model.pt holds the normalization that metrics.json reports, and, loaded into a fresh MLP,
   reproduces exactly the test accuracy and the confusion matrix that metrics.json reports, on
   test digits read here straight from the IDX file (not through mnist.py's or torchvision's
   loading code). A model trained on a GPU is checked here on the CPU, which adds numbers up in
   another order: --near-ties N lets up to N test digits, whose top two logits were nearly tied,
   come out the other way. Where none did, each digit's precision, recall, F1 and support are
   sklearn's for those predictions, the mistakes are the 25 wrong test digits that the model was
   surest of, surest first, and the history has a row per epoch, ending at the final scores.
4. Each figure shows what it should, read from the PNG here, with nothing of mnist.py's plotting
   code: the tiles of digits.png are the first 40 digits of the training file, and those of
   misclassified.png the test digits of the mistakes, read from the IDX files; each cell of
   confusion_matrix.png has the colour of its count; each tile of first_layer.png shows its
   unit's weights in model.pt; and training_curves.png has a marker at each epoch's loss and
   accuracy, train and validation, and its schedule passes through the rate of each step.
5. With --log RUN_LOG (what the run printed, seed 0 on a CPU): the output samples in mnist.py's
   lesson (Parts 1 and 2) are true: each must appear in the run's output exactly, but for epoch
   lines, which must match to within 0.01 in each loss and 0.3 points in each accuracy (another
   type of CPU rounds differently; the seconds differ anyway).
6. With --predictions FILE (what `--predict docs/digits-to-try` printed): at least 9 of the 10
   samples are read as the digit their file name starts with, and each tile of predictions.png,
   read from the PNG, is a digit prepared as MNIST's are (its mass centred, 20 pixels on its
   longer side), which the saved model reads as the line of its file says (for 9 of the 10, at
   least, as the tile is only a picture of the digit that was read).

Usage: python .ci/check_outputs.py [OUTPUT_DIR] [DATA_DIR] [--gate 0.98] [--near-ties 0]
                                   [--log RUN_LOG] [--predictions FILE]
"""

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_fscore_support

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnist import MLP  # noqa: E402  the network's layers, to reload model.pt


def read_idx(raw, name):
    """An IDX file: big-endian magic (last byte = number of dimensions), sizes, then uint8 data."""
    data = gzip.decompress((raw / f"{name}.gz").read_bytes())
    dimensions = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=dimensions, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def pixels(png):
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB")).astype(float)


def tiles(png):
    """The square pictures in a grid figure, in reading order, each as a (28, 28) array of its
    brightness in [0, 1]: the large square shapes that are not white, all of about one size."""
    rgb = pixels(png)
    shapes = ndimage.find_objects(ndimage.label(rgb.mean(axis=2) < 250)[0])
    sides = [(box[0].stop - box[0].start, box[1].stop - box[1].start) for box in shapes]
    side = np.median([max(size) for size in sides if min(size) > 40])
    found = sorted((box for box, size in zip(shapes, sides)
                    if abs(size[0] - side) <= 3 and abs(size[1] - side) <= 3),
                   key=lambda box: (round(box[0].start / side), box[1].start))
    return [np.asarray(Image.fromarray(rgb[box].mean(axis=2).astype(np.float32)).resize(
        (28, 28), Image.Resampling.BOX)) / 255 for box in found], found, rgb


def same_pictures(shown, expected):
    """Whether each tile shows its expected image: what imshow draws, the image scaled to its own
    range, correlates at 0.95 or more with the tile, and better than with any other image."""
    if len(shown) != len(expected):
        return False
    expected = [(image - image.min()) / max(1e-9, image.max() - image.min()) for image in
                np.asarray(expected, dtype=float)]
    scores = np.array([[np.corrcoef(tile.ravel(), image.ravel())[0, 1] for image in expected]
                       for tile in shown])
    return bool((scores.diagonal() >= 0.95).all() and (scores.argmax(axis=1) ==
                                                       np.arange(len(shown))).all())


def colour_values(rgb, colormap, low, high):
    """Each pixel's value on a matplotlib colormap from low to high: its nearest colour's."""
    palette = matplotlib.colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255
    nearest = ((rgb[..., None, :] - palette) ** 2).sum(axis=-1).argmin(axis=-1)
    return low + (high - low) * nearest / 255


def near(rgb, where, colour, reach=5):
    """Whether pixels of this colour lie within reach pixels of each (row, column) in where."""
    mask = np.abs(rgb - colour).sum(axis=2) < 80
    return all(mask[max(0, round(row) - reach):round(row) + reach + 1,
                    max(0, round(column) - reach):round(column) + reach + 1].any()
               for row, column in where)


def check_curves(png, history, rates):
    """training_curves.png: three panels, their frames found as full-length dark lines; a marker
    of matplotlib's first colour at each epoch's train number, of its second at validation's,
    in the loss and the accuracy panels (axes fitted to the data with matplotlib's 5 % margins),
    and the schedule's line through the rate of every step."""
    rgb = pixels(png)
    dark = rgb.max(axis=2) < 100
    top, bottom = np.nonzero(dark.sum(axis=1) > 0.8 * dark.shape[1] / 3 * 0.85)[0][[0, -1]]
    columns = np.nonzero(dark.sum(axis=0) > 0.8 * (bottom - top))[0]
    edges = [group[[0, -1]] for group in np.split(columns, np.nonzero(np.diff(columns) > 5)[0] + 1)]
    if len(edges) != 6:
        return f"found {len(edges)} panel edges, not the 6 of three panels"
    panels = [(edges[i][0], edges[i + 1][-1]) for i in (0, 2, 4)]

    def position(x, y, xs, ys, panel):
        (left, right), (x0, x1), (y0, y1) = panel, (min(xs), max(xs)), (min(ys), max(ys))
        x_span, y_span = max(x1 - x0, 1e-12), max(y1 - y0, 1e-12)
        return (bottom - (y - y0 + 0.05 * y_span) / (1.1 * y_span) * (bottom - top),
                left + (x - x0 + 0.05 * x_span) / (1.1 * x_span) * (right - left))

    epochs = [row["epoch"] for row in history]
    for panel, measure in zip(panels, ("loss", "accuracy")):
        lines = [(f"{split}_{measure}", colour) for split, colour in
                 (("train", (31, 119, 180)), ("val", (255, 127, 14))) if f"{split}_{measure}"
                 in history[0]]
        values = [row[key] for key, _ in lines for row in history]
        for key, colour in lines:
            where = [position(epoch, row[key], epochs * len(lines), values, panel)
                     for epoch, row in zip(epochs, history)]
            if not near(rgb, where, colour):
                return f"the {measure} panel has no marker at some epoch's {key}"
    steps = list(range(1, len(rates) + 1))
    sampled = steps[::max(1, len(steps) // 40)]
    if not near(rgb, [position(step, rates[step - 1], steps, rates, panels[2]) for step in
                      sampled], (31, 119, 180), reach=3):
        return "the schedule's line does not pass through each step's rate"
    return None


parser = argparse.ArgumentParser()
parser.add_argument("output_dir", nargs="?", type=Path, default=Path("outputs"))
parser.add_argument("data_dir", nargs="?", type=Path, default=Path("data"))
parser.add_argument("--gate", type=float, default=0.98)
parser.add_argument("--near-ties", type=int, default=0)
parser.add_argument("--log", type=Path)
parser.add_argument("--predictions", type=Path)
args = parser.parse_args()
output_dir, raw, GATE = args.output_dir, args.data_dir / "MNIST" / "raw", args.gate

for name in ("metrics.json", "model.pt"):
    path = output_dir / name
    if not path.is_file() or path.stat().st_size == 0:
        sys.exit(f"FAIL: {path} is missing or empty")
# Each figure's size: mnist.py's figsize, in inches, at 100 dpi. misclassified.png holds 25
# mistakes in 5 rows of 5; first_layer.png 128 units in 8 rows of 16.
SIZES = {"digits.png": (1440, 680), "training_curves.png": (1500, 400),
         "confusion_matrix.png": (700, 600), "misclassified.png": (740, 830),
         "first_layer.png": (960, 530)}
for name, size in SIZES.items():
    try:
        with Image.open(output_dir / name) as image:
            if image.format != "PNG" or max(abs(a - b) for a, b in zip(image.size, size)) > 1:
                sys.exit(f"FAIL: {name} is a {image.format} of {image.size}, not the {size} PNG "
                         "that this figure makes")
            image.verify()
    except OSError as error:
        sys.exit(f"FAIL: {name}: {error}")

metrics = json.loads((output_dir / "metrics.json").read_text())
if not {"val_accuracy", "val_loss"} <= set(metrics) or "test_accuracy" in metrics["history"][-1]:
    sys.exit("FAIL: metrics.json should hold validation numbers, and per-epoch rows no test numbers")
if metrics["test_accuracy"] < GATE:
    sys.exit(f"FAIL: test accuracy {metrics['test_accuracy']:.4f} is below the gate {GATE}")

test_images = read_idx(raw, "t10k-images-idx3-ubyte")
images = torch.from_numpy(test_images.astype(np.float32))                          # (10000, 28, 28)
labels = torch.from_numpy(read_idx(raw, "t10k-labels-idx1-ubyte").astype(np.int64))  # (10000,)
saved = torch.load(output_dir / "model.pt", weights_only=True)
mean, std = saved["mean"], saved["std"]
if (mean, std) != (metrics["normalization"]["mean"], metrics["normalization"]["std"]):
    sys.exit("FAIL: model.pt and metrics.json hold different normalizations")

model = MLP()
model.load_state_dict(saved["weights"])
model.eval()
with torch.no_grad():
    logits = model((images / 255 - mean) / std)
    predictions = logits.argmax(dim=1)

accuracy = (predictions == labels).sum().item() / len(labels)
matrix = torch.zeros(10, 10, dtype=torch.long)
matrix.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
# Each digit predicted the other way moves one count between two cells of the matrix.
moved = (matrix - torch.tensor(metrics["confusion_matrix"])).abs().sum().item() / 2
top_two = logits.topk(2, dim=1).values
near_ties = ((top_two[:, 0] - top_two[:, 1]) < 1e-3).sum().item()
if moved > args.near_ties or abs(accuracy - metrics["test_accuracy"]) * len(labels) > moved:
    sys.exit(f"FAIL: reloaded model scores {accuracy} and {moved:g} predictions differ from "
             f"metrics.json ({metrics['test_accuracy']}); allowed: {args.near_ties} "
             f"(near-ties here: {near_ties})")
print(f"OK: all reports written; test accuracy {accuracy:.4f} (gate {GATE}); model.pt reproduces "
      f"the accuracy and the confusion matrix in metrics.json ({moved:g} predictions differ, "
      f"{args.near_ties} allowed)")

history = metrics["history"]
if [row["epoch"] for row in history] != list(range(1, metrics["settings"]["epochs"] + 1)) or (
        history[-1]["val_accuracy"], history[-1]["val_loss"]) != (metrics["val_accuracy"],
                                                                   metrics["val_loss"]):
    sys.exit("FAIL: the history should hold a row per epoch, ending at the final validation scores")
if moved == 0:
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(10), zero_division=0)
    for digit in range(10):
        row = metrics["per_class"][str(digit)]
        if (abs(np.array([row["precision"], row["recall"], row["f1-score"]])
                - [precision[digit], recall[digit], f1[digit]]).max() > 1e-9
                or row["support"] != support[digit]):
            sys.exit(f"FAIL: digit {digit}'s precision, recall, F1 or support in metrics.json is "
                     "not sklearn's for the reloaded model's predictions")
    confidences = logits.softmax(dim=1).max(dim=1).values
    wrong = (predictions != labels).nonzero().flatten()
    surest = wrong[confidences[wrong].argsort(descending=True)][:25].tolist()
    if [mistake["index"] for mistake in metrics["mistakes"]] != surest:
        sys.exit("FAIL: metrics.json's mistakes are not the 25 wrong test digits that the model "
                 "was surest of, surest first")
    print("OK: the history, each digit's scores and the mistakes are what the reloaded model "
          "gives on the test file")

# The figures, read from their pixels.
if not same_pictures(tiles(output_dir / "digits.png")[0],
                     read_idx(raw, "train-images-idx3-ubyte")[:40]):
    sys.exit("FAIL: digits.png does not show the first 40 digits of MNIST's training file")
if not same_pictures(tiles(output_dir / "misclassified.png")[0],
                     test_images[[mistake["index"] for mistake in metrics["mistakes"]]]):
    sys.exit("FAIL: misclassified.png does not show the test digits of the mistakes")
rgb = pixels(output_dir / "confusion_matrix.png")
blue = np.nonzero((rgb[..., 2] - rgb[..., 0] > 4).sum(axis=1) > 100)[0]  # the heatmap's rows
columns = np.nonzero((rgb[..., 2] - rgb[..., 0] > 4).sum(axis=0) > 100)[0]
height, width = (blue[-1] - blue[0] + 1) / 10, (columns[-1] - columns[0] + 1) / 10
counts = np.array(metrics["confusion_matrix"], dtype=float)
for row in range(10):
    for column in range(10):
        top, left = blue[0] + row * height, columns[0] + column * width
        corner = rgb[round(top + 3):round(top + 8), round(left + 3):round(left + 8)]  # no text
        shown = np.median(colour_values(corner, "Blues", counts.min(), counts.max()))
        if abs(shown - counts[row, column]) > (counts.max() - counts.min()) / 255:  # a level
            sys.exit(f"FAIL: confusion_matrix.png's cell ({row}, {column}) has the colour of "
                     f"{shown:.0f}, not of its count, {counts[row, column]:.0f}")
shown, boxes, rgb = tiles(output_dir / "first_layer.png")
weights = saved["weights"]["layers.1.weight"]
weights = (weights / weights.abs().amax(dim=1, keepdim=True)).view(-1, 28, 28).numpy()
for unit, box in enumerate(boxes):  # the colour at the middle of each weight's square
    rows, columns = ((np.arange(28) + 0.5) * (box[axis].stop - box[axis].start) / 28 +
                     box[axis].start for axis in (0, 1))
    values = colour_values(rgb[rows.astype(int)][:, columns.astype(int)], "RdBu_r", -1, 1)
    if len(boxes) != len(weights) or np.abs(values - weights[unit]).max() > 0.05:
        sys.exit(f"FAIL: first_layer.png's tile {unit} of {len(boxes)} does not show unit "
                 f"{unit}'s weights, of {len(weights)} units, in model.pt")
problem = check_curves(output_dir / "training_curves.png", history, metrics["learning_rates"])
if problem:
    sys.exit(f"FAIL: training_curves.png: {problem}")
print("OK: each figure, read from its pixels, shows what it should: the first training digits, "
      "the test digits of the mistakes, the confusion matrix's counts, each unit's weights, and "
      "the history and the schedule")

if args.log:
    printed = args.log.read_text(encoding="utf-8").splitlines()
    source = (Path(__file__).resolve().parent.parent / "mnist.py").read_text(encoding="utf-8")
    lesson = source[:source.index("\n# Part 3.")].splitlines()
    samples = []  # the comment lines under each "... print(s):" line in Parts 1 and 2
    for number, line in enumerate(lesson):
        if line.startswith("#") and re.search(r"prints?:$", line):
            block = []
            for sample in lesson[number + 1:]:
                if not sample.startswith("#   "):
                    break
                block.append(sample[4:])
            samples += block
    if len(samples) < 7:
        sys.exit(f"FAIL: found {len(samples)} sample lines in mnist.py: expected at least the "
                 "loss before training and the trace")
    for sample in samples:
        if sample.startswith("epoch"):
            epoch = sample.split()[1]
            run = next((line for line in printed if line.split()[:2] == ["epoch", epoch]), "")
            numbers = [re.findall(r"\d+\.\d+", text)[:4] for text in (sample, run)]
            tolerances = [0.01, 0.3, 0.01, 0.3]  # loss, accuracy (in %), loss, accuracy
            if len(numbers[1]) != 4 or any(abs(float(a) - float(b)) > tolerance for a, b, tolerance
                                           in zip(*numbers, tolerances)):
                sys.exit(f"FAIL: mnist.py's sample\n  {sample}\nis not what the run printed:\n  {run}")
        elif sample.strip() not in [line.strip() for line in printed]:
            sys.exit(f"FAIL: mnist.py's sample line\n  {sample}\nwas not printed by the run")
    print(f"OK: the {len(samples)} output sample lines in mnist.py's lesson match the run")

if args.predictions:
    lines = [line for line in args.predictions.read_text(encoding="utf-8").splitlines() if line]
    right, read = [], []
    for line in lines:  # "docs/digits-to-try/7-handwritten-white-on-black.png: 7 (99.6%)"
        match = re.fullmatch(r".*[\\/](\d)-[^\\/]*: (\d) \(.*\)", line)
        read.append(int(match.group(2)) if match else None)
        if match and match.group(1) == match.group(2):
            right.append(line)
    if len(lines) != 10 or len(right) < 9:
        sys.exit(f"FAIL: --predict read {len(right)} of {len(lines)} samples as their names say "
                 "(at least 9 of 10 needed):\n" + "\n".join(lines))
    digits = np.array(tiles(output_dir / "predictions.png")[0])  # (10, 28, 28), as drawn
    with torch.no_grad():
        seen = model((torch.from_numpy(digits).float() - mean) / std).argmax(dim=1).tolist()
    rows, columns = np.arange(28)[:, None], np.arange(28)[None, :]
    mass = digits.sum(axis=(1, 2))
    centres = [((digit * rows).sum() / total, (digit * columns).sum() / total)
               for digit, total in zip(digits, mass)]
    inked = [np.nonzero(digit > 0.3) for digit in digits]
    sides = [max(np.ptp(found[0]), np.ptp(found[1])) + 1 for found in inked]
    if (len(digits) != len(lines) or sum(a == b for a, b in zip(seen, read)) < len(lines) - 1
            or any(abs(row - 14) > 1.5 or abs(column - 14) > 1.5 for row, column in centres)
            or any(not 17 <= side <= 21 for side in sides)):
        sys.exit(f"FAIL: predictions.png shows {len(digits)} tiles, read as {seen} where the lines "
                 f"say {read}, with centres {np.round(centres, 1).tolist()} and sides {sides}")
    print(f"OK: --predict read {len(right)} of the {len(lines)} samples as their names say, and "
          "predictions.png shows each as the network saw it")
