"""Teach a small neural network to read handwritten digits (MNIST): a lesson in one file.

    pip install -r requirements.txt   # README.md, "Install", says which torch suits you
    python mnist.py                   # downloads MNIST (11 MB) once, trains, writes outputs/

Expect about 98.4% test accuracy in 15 to 20 seconds on a 2-core CPU (docs/RESULTS.md).
docs/mnist.ipynb is this lesson as a notebook, with every output and picture under its code.

How a network learns: it turns a digit's 784 pixels into ten scores, a loss says how wrong they
are, backward() finds which way each of its numbers should move, and an optimizer moves them a
little; a step, on a batch of digits, repeated epoch after epoch over the training digits. Part 1
builds these pieces in that order, a "# %%" notebook cell per section, and train_model (section 12)
runs them: copy all of it. Skim the code that checks and prints (pick_device, describe_data,
loss_before_training, trace_one_digit, final_scores). Part 2 makes a command-line tool of it: skip
it on a first read.
"""

# %% 1. Imports, and the device
import copy       # deepcopy: copies of objects
import functools  # partial: a function with some of its arguments filled in
import math       # log, ceil and isnan
import sys        # stderr, where notes go
import time       # timing

import matplotlib.pyplot as plt  # figures
import numpy as np               # arrays, to prepare your own images
import seaborn as sns            # heatmaps
import torch                     # the numbers, and how to learn them
import torch.nn as nn            # the network's layers
import torch.nn.functional as F  # the same operations as plain functions
import torchvision               # downloads and reads MNIST's files
from PIL import Image            # opens and resizes images
from sklearn.metrics import classification_report, confusion_matrix  # scores per digit

# A *device* is where numbers live and arithmetic runs: the CPU, or a GPU, doing many at once
# ("cuda": NVIDIA's, or AMD's with torch's ROCm build; "mps": Apple's). Skim pick_device.

def pick_device(name="auto"):
    """torch.device(name) ("cpu", "cuda" or "mps") if a small computation runs there; for "auto",
    the first of "cuda" and "mps" where it runs, else the CPU."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    found = [kind for kind in ("cuda", "mps") if available[kind]]
    for kind in found if name == "auto" else [name]:
        try:  # torch can list a GPU that it cannot use, such as one too old for this torch build
            if kind != "cpu" and not available[kind]:
                raise RuntimeError(f"torch finds no {kind} device here")
            torch.ones(1, device=kind).add(1).item()  # .item() waits for it: errors show here
            return torch.device(kind)
        except RuntimeError as error:  # its first sentence says what went wrong
            problem = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]
            if name != "auto":
                raise RuntimeError(problem) from error
            print(f"the {kind} device failed a test step ({problem}); the run continues on the "
                  "CPU", file=sys.stderr)
    return torch.device("cpu")


# %% 2. The data
# MNIST holds 70,000 handwritten digits, each a 28 x 28 grey image with its label, 0 to 9:
# 60,000 to train on, and 10,000 to test on, by people who wrote none of the training digits.
# torch holds them in *tensors*, arrays of numbers with a shape: the training images are one
# tensor of shape (60000, 28, 28). A network can learn its training digits by heart and still
# read new ones badly: it *overfits*. The test set answers one question, once, at the very end:
# how well does the finished model read handwriting it has never seen? If we also chose settings
# by it, we would slowly fit them to those 10,000 digits, and the score would flatter the model.
# So we hold out a *validation* set of 5,000 training digits, and make every choice on it instead
# (docs/RESULTS.md). A *seed* makes a random-number generator draw the same numbers every time.

def load_split(data_dir, split):
    """MNIST's "train" or "test" split: images (N, 28, 28) of bytes, 0-255, and labels (N,)."""
    # download=True fetches the four files into data_dir/MNIST/raw/ unless they are there.
    dataset = torchvision.datasets.MNIST(data_dir, train=split == "train", download=True)
    return dataset.data, dataset.targets


def load_mnist(data_dir, validation_size, device):
    """The splits, {name: (images, labels)} on the device, and the training pixels' mean and
    std. With validation_size 0 there is no "validation" split."""
    images, labels = load_split(data_dir, "train")  # (60000, 28, 28), (60000,)
    if not 0 <= validation_size < len(images):
        raise ValueError(f"validation_size must be 0 to {len(images) - 1}, not {validation_size}")
    # Shuffled with a seed of its own, so that every run validates on the same digits.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    to_train, to_validate = order[validation_size:], order[:validation_size]
    splits = {"train": (images[to_train], labels[to_train]),             # (55000, 28, 28)
              "validation": (images[to_validate], labels[to_validate]),  # (5000, 28, 28)
              "test": load_split(data_dir, "test")}                      # (10000, 28, 28)
    if validation_size == 0:
        del splits["validation"]
    # Networks usually learn faster from inputs centred on 0 with a spread of about 1, so pixels
    # are scaled to [0, 1], then standardized: (pixel - mean) / std, std being the standard
    # deviation. The mean and std (about 0.13 and 0.31) come from the training digits alone, so
    # that nothing about the validation and test digits leaks into training. The data moves to the
    # device once, and stays; div_ and sub_ change it in place, with no copy (a trailing _ says so).
    pixels = {name: split[0].to(device).float().div_(255) for name, split in splits.items()}
    std, mean = torch.std_mean(pixels["train"])  # torch returns std first
    mean, std = mean.item(), std.item()  # .item() turns a one-number tensor into a float
    normalized = {name: (pixels[name].sub_(mean).div_(std), split[1].to(device))
                  for name, split in splits.items()}
    return normalized, (mean, std)


def describe_data(splits, mean, std):
    """Print each split's shapes and the pixels' range: look at the data before training."""
    for name, (images, labels) in splits.items():
        print(f"{name:>10}: images {tuple(images.shape)} {images.dtype}, "
              f"labels {tuple(labels.shape)} {labels.dtype}")
    images = splits["train"][0]
    print(f"pixels: 0-255 in the files, scaled to [0, 1] and standardized with the training "
          f"mean {mean:.4f} and std {std:.4f}: now {images.min():.2f} to {images.max():.2f}")


# %% 3. The model
# A *unit* (a "neuron") computes one number: a weighted sum of its inputs plus a bias. In a
# *fully connected* layer every unit sees every input: nn.Linear(784, 128) holds a weight matrix
# W of 128 x 784 and a bias vector b of 128, and turns a digit x (784 pixels) into W x + b. The
# weights and biases are the network's *parameters*, the numbers that training adjusts. Between
# layers sits ReLU(z) = max(0, z); without it two layers would collapse into one, as W2 (W1 x +
# b1) + b2 is just another W x + b. A stack of such layers is a multi-layer perceptron, an MLP.
# In torch a network is an nn.Module, whose method forward computes the output for a *batch* of
# B digits at once (shapes below are (B, ...)); nn.Sequential applies its layers in turn.
# *Dropout* fights overfitting: in training, it sets each unit's output to 0 with probability 0.2,
# drawn anew for every digit each time, so that the network cannot rely on any one unit, and
# multiplies the others by 1 / (1 - 0.2) = 1.25, so that each unit keeps its expected output.
# model.train() switches it on, model.eval() off. It helps a network that overfits (README exercise
# 10). Ours, shown shifted digits (section 6), hardly overfits in so short a training, and scored
# higher on the validation set without dropout (docs/RESULTS.md). It keeps dropout because this
# lesson reproduces a published network, which has it (README.md).
# The last layer gives ten *logits*, one score per digit, any real number: the larger, the more
# the network favours that digit. *Softmax* turns them into probabilities that sum to 1:
# p_i = e^(z_i) / (e^(z_0) + ... + e^(z_9)). The *loss* is one number that says how wrong the
# network is; training lowers it. *Cross-entropy* loss is -ln(p of the right digit): 0 when the
# network is sure and right, and growing without limit as that p goes to 0. The model stops at
# the logits: F.cross_entropy applies softmax itself, computing ln(p) straight from the logits
# (a "log-softmax"), which stays accurate even where p itself would round to 0.

class MLP(nn.Module):
    def __init__(self, dropout=0.2):
        super().__init__()  # nn.Module's own set-up, which tracks the layers' parameters
        self.layers = nn.Sequential(
            nn.Flatten(),         # (B, 28, 28) -> (B, 784): each digit a row of 784 pixels
            nn.Linear(784, 128),  # (B, 128): 128 x 784 weights + 128 biases
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, 64),   # (B, 64): 64 x 128 + 64
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(64, 10),    # (B, 10), the logits: 10 x 64 + 10
        )

    def forward(self, images):  # model(images) calls this
        return self.layers(images)


# %% 4. A check before training
# nn.Linear starts its weights small and random, so the ten logits start close to each other, and
# softmax gives each digit about 1/10: an untrained network is equally unsure of every digit.
# Cross-entropy then scores about -ln(1/10) = ln(10) = 2.30. A loss far above that means it starts
# out confidently wrong: look for a bug in the model or in the pixels' scaling. Seed 0 prints:
#   loss before training: 2.307 (a guess scores ln(10) = 2.303)

def loss_before_training(model, images, labels):
    """Print and return the untrained model's mean loss, with dropout off."""
    loss = F.cross_entropy(model.eval()(images), labels).item()
    print(f"loss before training: {loss:.3f} (a guess scores ln(10) = {math.log(10):.3f})")
    return loss


# %% 5. How a network learns: one step
# A training *step*: digits go in and logits come out (the *forward pass*), the loss measures how
# wrong they are, and the parameters move a little to lower it. torch records the forward pass as a
# *graph*: which numbers each operation combined into which. loss.backward() walks the graph
# backwards with the chain rule of calculus, and stores in each parameter's .grad its *gradient*:
# how fast the loss changes as that parameter changes. An *optimizer* then moves every parameter
# against its gradient, downhill. Stochastic gradient descent (SGD: stochastic, as each step sees a
# random sample of the digits) does w <- w - lr * gradient: the *learning rate* lr sets the size.
#
# Adam (Kingma and Ba, 2015), ours, keeps two running averages for each weight, of its gradient g
# and of g^2: at each step they keep 0.9 of their old value (Adam's beta1) and 0.999 (its beta2),
# and take the rest from the newest gradient. As they start at 0, they are too small at first; Adam
# divides them by 1 - 0.9^t and 1 - 0.999^t at step t to make up for it, giving m and v. It moves
# the weight against the gradient by lr * m / (sqrt(v) + 1e-8): usually about lr or less, whatever
# the gradient's size. On the first step, m = g and v = g^2, so the move is lr * |g| / (|g| +
# 1e-8), which is lr unless g is tiny.
#
# The learning rate need not stay fixed: a *schedule* sets it anew for every step. Ours,
# "one-cycle", starts at lr / 25, rises to lr over the first 15% of the steps, then falls to
# almost 0, both along a cosine curve. At first the weights are random and Adam's averages rest on
# only a few gradients, yet Adam moves every weight by about the rate: the low start keeps these
# poorly aimed steps small. Big steps then cover ground fast, and tiny steps at the end settle
# into a low point of the loss. Here is the first step for one digit, with the run's optimizer at
# its first rate, our lr of 3e-3 / 25 = 0.00012. Seed 0 prints:
#   one training digit (label 8), through a copy of the model with dropout off:
#     logits          0.16  -0.05   0.10   0.17   0.19   0.06  -0.20   0.03  -0.07  -0.03
#     probabilities  0.112  0.091  0.106  0.114  0.116  0.102  0.079  0.098  0.089  0.093
#     loss -ln(p[8]) = -ln(0.089) = 2.414
#     the first layer's largest gradient, -0.097338: unit 73's weight for pixel 158, now -0.024416
#     Adam's first step, at lr = 0.000120, moves it by +0.000120 to -0.024296

def make_scheduler(optimizer, schedule, lr, total_steps):
    """The learning rate's schedule: "one-cycle", or "constant", as in the published recipe."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    # lr / 25 is OneCycleLR's default start; cycle_momentum=False keeps Adam's beta1 at 0.9.
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                               pct_start=0.15, cycle_momentum=False)


def trace_one_digit(model, optimizer, image, label):
    """Print one digit's logits, probabilities, loss and gradient, and the optimizer's step."""
    # Copied together, the copy of the optimizer moves the copy's weights, at the current rate.
    model, optimizer = copy.deepcopy((model, optimizer))
    logits = model.eval()(image[None])[0]  # [None] adds a batch dimension: (1, 28, 28), (1, 10)
    probabilities = logits.softmax(dim=0)  # (10,), summing to 1 along dimension 0, the only one
    loss = F.cross_entropy(logits[None], label[None])  # -ln(probabilities[label])
    loss.backward()  # fills each parameter's .grad
    # The first weight matrix (biases have one dimension): (128, 784), a row per unit, as flatten(1)
    # makes any layer's. divmod turns argmax's place, counted row by row, into (row, column).
    weights = next(weights for weights in model.parameters() if weights.dim() > 1)
    gradients = weights.grad.flatten(1)
    unit, pixel = divmod(gradients.abs().argmax().item(), gradients.shape[1])
    before, gradient = weights.flatten(1)[unit, pixel].item(), gradients[unit, pixel].item()
    optimizer.step()
    after, digit = weights.flatten(1)[unit, pixel].item(), label.item()
    name, lr = type(optimizer).__name__, optimizer.param_groups[0]["lr"]  # "Adam"; the first rate
    print(f"one training digit (label {digit}), through a copy of the model with dropout off:\n"
          f"  logits        {' '.join(f'{z:6.2f}' for z in logits.tolist())}\n"
          f"  probabilities {' '.join(f'{p:6.3f}' for p in probabilities.tolist())}\n"
          f"  loss -ln(p[{digit}]) = -ln({probabilities[digit]:.3f}) = {loss.item():.3f}\n"
          f"  the first layer's largest gradient, {gradient:+.6f}: unit {unit}'s weight for pixel "
          f"{pixel}, now {before:+.6f}\n  {name}'s first step, at lr = {lr:.6f}, moves it by "
          f"{after - before:+.6f} to {after:+.6f}")
    return probabilities, (before, gradient, after)


# %% 6. Batches
# Training takes its steps on *mini-batches* of B digits (256 by default); a step's loss is the
# mean over its batch. An *epoch* is one pass over all the training digits in a new random
# order: 55,000 / 256 rounds up to 215 steps, so 10 epochs take 2,150. MNIST fits in memory,
# so a batch is simply the digits at 256 shuffled indices.

def shift_randomly(images, max_shift, background, generator):
    """Move each digit by up to max_shift pixels in each direction: an *augmentation*, new
    training examples that keep their labels. background, the value of a black pixel after
    standardizing (-mean / std), fills what a shift uncovers. (B, 28, 28) -> (B, 28, 28)."""
    # A 7 moved by a pixel is still a 7, but to a fully connected network every pixel is a
    # separate input, so it must be shown moved digits to learn that.
    s, count, device = max_shift, len(images), images.device
    padded = F.pad(images, (s, s, s, s), value=background)  # (B, 28 + 2s, 28 + 2s)
    # unfold lists every 28 x 28 window of each padded digit, without copying: (B, 2s + 1, 2s + 1,
    # 28, 28). The window at row dy, column dx shows the digit moved s - dy pixels down and s - dx
    # right (less than 0: up, or left). Each digit keeps one window, drawn at random: all (2s + 1)^2
    # are equally likely.
    windows = padded.unfold(1, 28, 1).unfold(2, 28, 1)
    dy, dx = torch.randint(0, 2 * s + 1, (2, count), generator=generator).to(device)
    return windows[torch.arange(count, device=device), dy, dx]  # (B, 28, 28)


def shuffled_batches(images, labels, batch_size, max_shift, background, generator):
    """One epoch of (images (B, 28, 28), labels (B,)) batches, in a new random order each time;
    the last batch may be smaller."""
    # Each `yield` hands out one batch, when the loop asks for it. The order and the shifts come
    # from generator, on the CPU, so that a seed gives the same batches on any device.
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for start in range(0, len(images), batch_size):
        indices = order[start:start + batch_size]
        batch = images[indices]  # (B, 28, 28)
        if max_shift > 0:
            batch = shift_randomly(batch, max_shift, background, generator)
        yield batch, labels[indices]


# %% 7. Training, one epoch
# Each step: predict, measure the loss, let backward() compute the gradients, and let the
# optimizer move the parameters. Then the scheduler (section 5) sets the rate for the next step.

def train_one_epoch(model, batches, optimizer, scheduler):
    """One pass over the batches. Returns the mean loss and the accuracy over every digit, and
    the learning rate of each step."""
    model.train()  # dropout on
    loss_sum, correct, seen, rates = 0, 0, 0, []
    for images, labels in batches:
        logits = model(images)                  # (B, 10)
        loss = F.cross_entropy(logits, labels)  # the mean over the batch
        optimizer.zero_grad()  # backward() adds to .grad, so clear the last step's gradients
        loss.backward()
        optimizer.step()
        rates.append(scheduler.get_last_lr()[0])  # this step's rate (a list, one per group)
        scheduler.step()
        loss_sum += loss.detach() * len(labels)  # detach(): the number, without its graph
        correct += (logits.argmax(dim=1) == labels).sum()  # argmax: where each row is largest
        seen += len(labels)
    return loss_sum.item() / seen, correct.item() / seen, rates


# %% 8. Evaluation
# To measure, switch dropout off (model.eval()) and gradients off (torch.no_grad()): with no
# backward() to come, torch records no graph, which saves memory and time.

@torch.no_grad()
def evaluate(model, images, labels):
    """{"loss", "accuracy", "predictions": (N,), "confidences": (N,)}; the last two on the CPU."""
    model.eval()
    # 1,000 digits at a time, so that the layers' outputs for all N digits are never held at once.
    logits = torch.cat([model(chunk) for chunk in images.split(1000)])  # (N, 10)
    # .max(dim=1), along each row, gives each row's largest probability and the digit where it is.
    confidences, predictions = logits.softmax(dim=1).max(dim=1)  # (N,), (N,)
    return {"loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (predictions == labels).sum().item() / len(labels),
            "predictions": predictions.cpu(), "confidences": confidences.cpu()}


# %% 9. The training loop
# Each epoch trains on every training digit once, then scores the validation digits. The train
# numbers are averages taken while the weights still move, with dropout on and shifted digits, so
# train accuracy can sit below validation accuracy. If validation stops improving while training
# keeps improving, the model has begun to overfit. The seconds, and the last decimals, differ from
# one type of CPU to another. Seed 0 prints:
#   epoch   1  train loss 1.0500 accuracy 66.86%  validation loss 0.2363 accuracy 93.16%  0.54 s
#   epoch   2  train loss 0.3024 accuracy 90.81%  validation loss 0.1436 accuracy 95.46%  0.62 s

def train_and_validate(model, optimizer, scheduler, epoch_batches, epochs, validation):
    """Train; return one history row per epoch, and every step's learning rate. epoch_batches()
    gives one epoch's batches; validation is (images, labels), or None."""
    history, rates = [], []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy, epoch_rates = train_one_epoch(model, epoch_batches(),
                                                                  optimizer, scheduler)
        rates += epoch_rates
        if math.isnan(train_loss) or train_loss > 10 * math.log(10):  # 10 x a guess's loss
            raise FloatingPointError(f"the training loss reached {train_loss:.3g} in epoch "
                                     f"{epoch}: training has diverged, most likely because the "
                                     "learning rate is too high")
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy}
        line = f"epoch {epoch:>3}  train loss {train_loss:.4f} accuracy {train_accuracy:6.2%}"
        if validation is not None:
            scores = evaluate(model, *validation)
            row.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
            line += f"  validation loss {scores['loss']:.4f} accuracy {scores['accuracy']:6.2%}"
        history.append({**row, "seconds": time.perf_counter() - started})
        print(f"{line}  {history[-1]['seconds']:.2f} s")
    return history, rates


# %% 10. The test set, scored once
# Only now, with every choice made, do we look at the test digits, once. (Each run prints their
# score: while you still choose settings, ignore it and compare validation's.) The training digits
# are scored again, with dropout off and no shifts, to compare fairly. Per digit d: *precision*,
# the share of the digits read as d that were d; *recall*, the share of the true d's read as d; F1
# = 2pr / (p + r), high only if both are; support, the number of test d's. The last rows average
# them, plainly and weighted by support. The *confusion matrix* counts test digits by true digit
# (rows) and prediction (columns): off its diagonal are the mistakes.

def final_scores(model, splits):
    """Score every split, print the test set's report, and return the scores."""
    results = {name: evaluate(model, *split) for name, split in splits.items()}
    test, truth = results["test"], splits["test"][1].cpu()
    predictions, confidences = test["predictions"], test["confidences"]
    # labels=range(10): ten rows, present or not; zero_division=0: 0/0 is 0; digits: decimals.
    every_digit = dict(labels=range(10), zero_division=0)
    print(f"\nthe test set:\n{classification_report(truth, predictions, digits=4, **every_digit)}")
    report = classification_report(truth, predictions, output_dict=True, **every_digit)
    print(", ".join(f"{name} accuracy {result['accuracy']:.2%}" for name, result in
                    results.items()))
    wrong = (predictions != truth).nonzero().flatten()
    wrong = wrong[confidences[wrong].argsort(descending=True)][:25]  # the most confident first
    scores = {f"{'val' if name == 'validation' else name}_{measure}": result[measure]  # val_loss
              for name, result in results.items() for measure in ("accuracy", "loss")}
    return {**scores, "per_class": {key: row for key, row in report.items() if key.isdigit()},
            "confusion_matrix": confusion_matrix(truth, predictions, labels=range(10)).tolist(),
            "mistakes": [{"index": i, "label": truth[i].item(), "predicted": predictions[i].item(),
                          "confidence": confidences[i].item()} for i in wrong.tolist()]}


def plot_confusion_matrix(matrix):
    """The confusion matrix as a heatmap: a count of test digits in each cell."""
    figure, axes = plt.subplots(figsize=(7, 6))
    sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, ax=axes)  # d: integers
    axes.set(xlabel="predicted digit", ylabel="true digit",
             title="Confusion matrix on the test set (off the diagonal: mistakes)")
    return figure


# %% 11. Your own handwriting
# A model knows only data like its training data; new data unlike it is a *distribution shift*.
# MNIST stores ink as high values on a background of 0 (pictures show it white on black), scaled so
# that the longer side is 20 pixels with soft grey edges, and placed with its centre of mass
# (the ink-weighted mean position) in the middle of the 28 x 28 field. A photo resized straight
# to 28 x 28 is none of these, and the network fails on it: so we prepare it as MNIST's were.

def prepare_digit(image, name="the image"):
    """A PIL image of one digit, prepared as MNIST's digits were: a (28, 28) tensor in [0, 1]."""
    # Lay the image on white paper, for ink drawn on a transparent canvas, and make it grey.
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255  # (height, width) in [0, 1]
    # An image's border is mostly background. If it is light, the ink is dark: invert.
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 0.5:
        grey, border = 1 - grey, 1 - border
    # Paper is rarely pure white: subtract the background's level, so it is 0; stretch ink to 1.
    ink = np.clip(grey - np.median(border), 0, None)
    if ink.max() < 0.1:  # less than a tenth of the full contrast: nothing to read
        raise ValueError(f"{name} has no ink to read: it is blank or all one colour. Give an image "
                         "of one digit, dark on light or light on dark")
    ink /= ink.max()
    rows, columns = np.nonzero(ink > 0.3)  # the ink's bounding box; 0.3 is above the noise
    box = ink[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    # Scale the box so that its longer side is 20 pixels. The Lanczos resampling filter blends
    # neighbouring pixels, which leaves soft grey edges (and can overshoot a little: clip).
    scale = 20 / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))  # PIL: (w, h)
    box = np.asarray(Image.fromarray(box).resize(size, Image.Resampling.LANCZOS)).clip(0, 1)
    # Put its centre of mass on pixel (14, 14), where MNIST's digits have theirs. paste() crops
    # whatever of a lopsided digit falls outside the 28 x 28 field.
    height, width = box.shape
    top = round(14 - (box.sum(axis=1) * np.arange(height)).sum() / box.sum())
    left = round(14 - (box.sum(axis=0) * np.arange(width)).sum() / box.sum())
    field = Image.new("F", (28, 28))  # mode F: a float per pixel, all 0 (black)
    field.paste(Image.fromarray(box), (left, top))
    return torch.from_numpy(np.array(field))  # (28, 28)


@torch.no_grad()
def predict(model, digits, mean, std):
    """Digits (N, 28, 28) in [0, 1] -> each digit's ten probabilities (N, 10), on the CPU."""
    model.eval()
    digits = digits.to(next(model.parameters()).device)  # where the model is: CPU or GPU
    # Normalized with the training mean and std, exactly as the training digits were.
    return model((digits - mean) / std).softmax(dim=1).cpu()


# %% 12. The recipe: everything above, in order
# Copy all of Part 1 into a notebook of your own, then (epochs=1 takes seconds; the default, 10):
#     model, metrics = train_model(epochs=1)
#     digit = prepare_digit(Image.open("my-digit.png"))  # (28, 28)
#     predict(model, digit[None], **metrics["normalization"]).argmax()  # the digit it reads

def train_model(epochs=10, batch_size=256, lr=3e-3, schedule="one-cycle", max_shift=1,
                dropout=0.2, validation_size=5000, seed=0, data_dir="data", device="auto",
                dry_run=False):
    """Train the MLP on MNIST and score it once on the test set. Returns (model, metrics).
    dry_run=True, a quick check: 1 epoch of 3 batches, and 1,000 validation and test digits."""
    device = pick_device(device)
    epochs = 1 if dry_run else epochs
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                    max_shift=max_shift, dropout=dropout, validation_size=validation_size,
                    seed=seed, data_dir=str(data_dir), device=str(device), dry_run=dry_run,
                    torch_version=torch.__version__)
    started = time.perf_counter()
    print("settings: " + " ".join(f"{key}={value}" for key, value in settings.items()))
    # The seed fixes the first weights and the dropout, and the generator below the batches, so a
    # run repeats exactly on the same machine (another CPU type or a GPU rounds differently).
    torch.manual_seed(seed)
    splits, (mean, std) = load_mnist(data_dir, validation_size, device)
    if dry_run:
        sizes = {"train": 3 * batch_size, "validation": 1000, "test": 1000}
        splits = {name: (images[:sizes[name]], labels[:sizes[name]])
                  for name, (images, labels) in splits.items()}
    describe_data(splits, mean, std)
    model = MLP(dropout).to(device)
    print(f"{model}\nparameters: {sum(weights.numel() for weights in model.parameters()):,}")
    train_images, train_labels = splits["train"]
    loss_before_training(model, train_images[:1000], train_labels[:1000])  # a steady mean
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total_steps = epochs * math.ceil(len(train_images) / batch_size)  # 2,150 by default
    scheduler = make_scheduler(optimizer, schedule, lr, total_steps)
    trace_one_digit(model, optimizer, train_images[0], train_labels[0])
    # Each call of epoch_batches() starts one epoch's batches.
    epoch_batches = functools.partial(shuffled_batches, train_images, train_labels, batch_size,
                                      max_shift, -mean / std, torch.Generator().manual_seed(seed))
    history, rates = train_and_validate(model, optimizer, scheduler, epoch_batches, epochs,
                                        splits.get("validation"))
    metrics = {"settings": settings, "normalization": {"mean": mean, "std": std},
               "history": history, **final_scores(model, splits), "learning_rates": rates}
    return model, {**metrics, "seconds": time.perf_counter() - started}


# =============================================================================================
# Part 2. The appendix: what a real tool needs besides the lesson. Skip it on a first read.
# =============================================================================================

# %% A. Part 2's own imports (Part 1 needs none of them), its errors, and the figures
import argparse
import json
import os
import pickle
import tempfile
from pathlib import Path

import matplotlib
from PIL import ImageOps


class UserError(Exception):
    """A problem the user can fix, such as a blank image: main() prints it in one line."""
    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# first_layer.png draws each first-layer unit's 784 weights as a 28 x 28 picture, red where ink
# raises the unit, blue where it lowers it. Look for stroke-like detectors, and a speckled border:
# a border pixel is black in nearly every digit, so a unit's border weights all get nearly the same
# gradient (about -0.42 times its bias's), so the random differences they started with stay.

def plot_grid(images, titles, title, columns):
    """Small images in a grid, each under its own title."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    height = 1.5 * rows + 0.8  # inches: 1.5 for each row of images, 0.8 for the title
    figure, grid = plt.subplots(rows, columns, figsize=(1.4 * columns + 0.4, height), squeeze=False)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.8 / height)
    for axes in grid.flat:
        axes.axis("off")
    for axes, image, text in zip(grid.flat, images, titles):
        axes.imshow(np.asarray(image), cmap="gray")  # white ink on black, as the network sees it
        axes.set_title(text, fontsize=9)
    figure.suptitle(title)
    return figure


def plot_first_layer(model):
    """Each first-layer unit's weights, a row of (128, 784), as a picture on its own scale."""
    weights = next(w for w in model.parameters() if w.dim() > 1).detach().cpu().flatten(1)
    side = math.isqrt(weights.shape[1])  # 28 (exercise 8's 3 x 3 filters: 3)
    tiles = (weights / weights.abs().amax(dim=1, keepdim=True)).view(-1, 1, side, side)
    mosaic = torchvision.utils.make_grid(tiles, nrow=16, padding=1, pad_value=float("nan"))[0]
    figure, axes = plt.subplots(figsize=(9.6, 0.6 * math.ceil(len(tiles) / 16) + 0.5))
    axes.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axes.set_title(f"The {len(tiles)} first-layer units' weights: what each one looks for")
    axes.axis("off")
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93)
    return figure


def plot_training_curves(history, rates):
    figure, all_axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    for axes, measure in zip(all_axes, ("loss", "accuracy")):
        for split, label in (("train", "train (while training)"), ("val", "validation")):
            if f"{split}_{measure}" in history[0]:
                axes.plot([row["epoch"] for row in history],
                          [row[f"{split}_{measure}"] for row in history], "o-", label=label)
        axes.set(xlabel="epoch", title=measure)
        axes.legend()
    all_axes[2].plot(range(1, len(rates) + 1), rates)
    all_axes[2].set(xlabel="step", ylabel="learning rate", title="the schedule, per step")
    for axes in all_axes:
        axes.grid(alpha=0.3)
    return figure


def draw_reports(model, metrics, raw):
    """Every figure of a training run, by file name. raw: fetch_mnist's unnormalized digits."""
    (train_images, train_labels), (test_images, _) = raw["train"], raw["test"]
    mistakes = metrics["mistakes"]
    return {
        "digits.png": plot_grid(train_images[:40], train_labels[:40].tolist(), "The first "
                                "digits in MNIST's training file, and their labels", columns=10),
        "training_curves.png": plot_training_curves(metrics["history"], metrics["learning_rates"]),
        "confusion_matrix.png": plot_confusion_matrix(metrics["confusion_matrix"]),
        "misclassified.png": plot_grid(
            test_images[[mistake["index"] for mistake in mistakes]],
            [f"{m['label']} → {m['predicted']} ({m['confidence']:.0%})" for m in mistakes],
            f"Test digits the model got wrong ({len(mistakes)} shown, the most confident first):"
            "\ntrue → predicted (confidence)", columns=5),
        "first_layer.png": plot_first_layer(model),
    }


# %% B. MNIST's files, and writing the reports

def fetch_mnist(data_dir):
    """Download MNIST unless it is there, or say in one line why torchvision cannot load it, or
    that it is not MNIST. Returns {"train", "test": (images, labels)} as stored, for the figures."""
    folder = (Path(data_dir) / "MNIST" / "raw").resolve()
    try:  # torchvision's errors for no network, HTTP 403, a damaged file, a folder that is a file
        stored = {split: load_split(data_dir, split) for split in ("train", "test")}
    except (RuntimeError, OSError, ValueError, AssertionError) as error:  # IDX headers: by assert
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # torchvision's own
        names = [name.removesuffix(".gz") for name, _ in torchvision.datasets.MNIST.resources]
        dotted = sorted(path.name for path in folder.glob("*.idx?-ubyte"))
        rename = f" Rename {', '.join(dotted)}: a hyphen, not a dot, before idx." if dotted else ""
        raise UserError(f"could not load MNIST ({reason}). Put the four files "
                        f"{', '.join(names)}, packed (.gz) or unpacked, into {folder}, or point "
                        "--data-dir at the folder that holds MNIST/raw/; delete a file there that "
                        f"is damaged, and run again.{rename}", exit_code=1) from None
    for name, (images, labels) in stored.items():  # torchvision reads any image IDX: MNIST's?
        prefix = "train" if name == "train" else "t10k"  # MNIST's name for its test files
        if not (images.shape[1:] == (28, 28) and len(images) == len(labels) > 0
                and 0 <= labels.min() <= labels.max() <= 9):
            raise UserError(f"{folder} holds {len(images):,} {prefix} images of "
                            f"{' x '.join(map(str, images.shape[1:]))} pixels and {len(labels):,}"
                            f" labels {labels.unique().tolist()[:10]}: not MNIST's. Delete its "
                            f"{prefix}-* files and run again.")
    return stored


def prepare_output_dir(output_dir):
    """Fail now, before training, if the reports could not be written later."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise UserError(f"cannot write to --output-dir {output_dir} ({error.strerror}); give a "
                        "folder you can write to") from None


def write_reports(output_dir, contents):
    """Write each figure (.png), model (.pt) or dict (.json) whole, or not at all."""
    for name, content in contents.items():
        path, temporary = output_dir / name, output_dir / f".{name}.partial"
        try:  # a temporary file first, then renamed into place: never a half-written report
            if name.endswith(".png"):
                content.savefig(temporary, format="png", dpi=100)
            elif name.endswith(".pt"):
                torch.save(content, temporary)
            else:
                temporary.write_text(json.dumps(content, indent=2) + "\n")
            os.replace(temporary, path)
        except OSError as error:  # on Windows, a file held open (an image viewer, OneDrive)
            raise UserError(f"cannot write {path} ({error.strerror}); if another program holds "
                            "it open, close it and run again", exit_code=1) from None
        finally:
            temporary.unlink(missing_ok=True)


# %% C. --predict: your images, and the trained model

def predict_files(paths, output_dir, device):
    """Print the digit read in each image; draw them as the network sees them."""
    model, (mean, std) = load_trained_model(output_dir)
    prepare_output_dir(output_dir)
    files = [file for path in paths for file in image_files(path)]
    # Every image is prepared before any is predicted: bad input stops the run with one line.
    digits = torch.stack([read_digit(file) for file in files])
    confidences, predicted = predict(model.to(device_or_error(device)), digits, mean, std).max(1)
    titles = []
    for file, digit, confidence in zip(files, predicted.tolist(), confidences.tolist()):
        print(f"{file}: {digit} ({confidence:.1%})")  # for example "my-seven.png: 7 (99.2%)"
        titles.append(f"{file.stem[:16]}\n{digit} ({confidence:.1%})")
    write_reports(output_dir, {"predictions.png": plot_grid(
        digits, titles, "Your digits as the network sees them", columns=8)})
    print(f"wrote {output_dir / 'predictions.png'}", file=sys.stderr)  # stdout: the digits alone
    return predicted, confidences


def image_files(path):
    """[path] for a file; for a folder, the images in it that Pillow can open, sorted."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give an image file, or a folder of them")
    if not path.is_dir():
        return [path]
    readable = {suffix for suffix, kind in Image.registered_extensions().items()
                if kind in Image.OPEN}  # not the formats that Pillow can only save, such as PDF
    # Hidden files are skipped: macOS leaves ._name.png metadata files on exFAT and network drives.
    files = sorted(file for file in path.iterdir() if file.is_file()
                   and not file.name.startswith(".") and file.suffix.lower() in readable)
    if not files:
        raise UserError(f"{path} is a folder with no image files in it; give PNG or JPEG files")
    return files


def read_digit(path):
    """The digit in an image file, upright and prepared (prepare_digit)."""
    try:
        with Image.open(path) as image:  # phones store photos sideways, with an EXIF note:
            image = ImageOps.exif_transpose(image)  # an upright copy, read whole (or failing) now
    except (OSError, ValueError, Image.DecompressionBombError):  # not an image, cut short...
        raise UserError(f"{path} is not an image that Pillow can read; give a PNG or JPEG file "
                        "of one digit") from None
    if image.mode.startswith("I"):  # 16-bit grey, as scanners save it: 0-65535, made 0-255
        image = Image.fromarray((np.asarray(image) / 257).clip(0, 255).round().astype(np.uint8))
    try:
        return prepare_digit(image, name=path)
    except ValueError as error:  # no ink to read
        raise UserError(str(error)) from None


def load_trained_model(output_dir):
    """The MLP and the normalization (mean, std) that a training run saved in model.pt."""
    path = output_dir / "model.pt"
    if not path.is_file():
        raise UserError(f"no trained model in {output_dir}: train one first with 'python "
                        "mnist.py', or point --output-dir at the folder that holds model.pt")
    try:
        # weights_only=True unpickles only tensors and plain data, which blocks the usual ways
        # that a file from elsewhere could run code (keep torch up to date).
        saved = torch.load(path, weights_only=True)
        if not (isinstance(saved, dict) and isinstance(saved.get("weights"), dict)
                and all(isinstance(saved.get(key), float) for key in ("mean", "std"))):
            raise ValueError("not {'weights': a state dict, 'mean': a float, 'std': a float}")
        model = MLP()
        model.load_state_dict(saved["weights"])  # a RuntimeError if the layers differ
        return model, (saved["mean"], saved["std"])
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError):  # not torch's, cut short
        raise UserError(f"{path} does not hold this script's network with its normalization: "
                        f"train again with 'python mnist.py --output-dir {output_dir}'") from None


# %% D. Flags, devices, and main()

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mnist.py", allow_abbrev=False,  # a typo such as --epoch is an error, not a guess
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a small network on MNIST, or read your own digits with it.")
    # A bad flag gets one line, where argparse would print its whole usage block first.
    parser.error = lambda message: parser.exit(2, f"mnist.py: error: {message} (see --help)\n")
    recipe = parser.add_argument_group("training recipe (the original: --lr 1e-3 --lr-schedule "
                                       "constant --max-shift 0 --batch-size 64)")
    recipe.add_argument("--epochs", type=int, default=10, help="passes over the training digits")
    recipe.add_argument("--batch-size", type=int, default=256, help="digits per step")
    recipe.add_argument("--lr", type=float, default=3e-3, help="(peak) learning rate of Adam")
    recipe.add_argument("--lr-schedule", choices=["one-cycle", "constant"], default="one-cycle",
                        help="how the learning rate changes over the run")
    recipe.add_argument("--max-shift", type=int, choices=range(5), default=1, metavar="{0..4}",
                        help="shift training digits by up to this many pixels (0: off)")
    recipe.add_argument("--dropout", type=float, default=0.2, help="dropout's probability (0: off)")
    recipe.add_argument("--seed", type=int, default=0, help="seed for weights, dropout and order")
    recipe.add_argument("--validation-size", type=int, default=5000, help="training digits held "
                        "out to validate on; 0 trains on all 60,000")
    run = parser.add_argument_group("running")
    run.add_argument("--predict", nargs="+", type=Path, metavar="IMAGE", help="read these images "
                     "(or folders of them) with the model in --output-dir, instead of training")
    run.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                     help="auto picks the first of cuda and mps that works, else cpu")
    run.add_argument("--data-dir", type=Path, default=Path("data"), help="holds MNIST/raw/")
    run.add_argument("--output-dir", type=Path, default=Path("outputs"), help="for the reports")
    run.add_argument("--dry-run", action="store_true", help="1 epoch of 3 batches: a smoke test")
    run.add_argument("--show", action="store_true", help="also open the figures in windows")
    args = parser.parse_args(argv)
    # torch keeps whole numbers in 64 bits: a huge one would overflow far from its flag.
    for flag, low, high in (("epochs", 1, 10**9), ("batch_size", 1, 10**9),
                            ("seed", 0, 2**64 - 1), ("validation_size", 0, 59_999)):
        if not low <= getattr(args, flag) <= high:
            parser.error(f"--{flag.replace('_', '-')} must be a whole number from {low} to "
                         f"{high}, not {getattr(args, flag)}")
    if not 0 < args.lr < math.inf:  # this also refuses nan, for which every comparison is false
        parser.error(f"--lr must be a positive finite number, not {args.lr}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be at least 0 and below 1, not {args.dropout}")
    return args


def command_line_flags():
    """sys.argv's flags, but not a notebook kernel's own (-f kernel.json; %run sets others)."""
    kernel_flags = any(flag == "-f" or flag.startswith("--f=") for flag in sys.argv[1:])
    return [] if "ipykernel" in sys.modules and kernel_flags else sys.argv[1:]


def device_or_error(name):
    """pick_device(name), or for a device that fails, the one-line error that names the build."""
    try:
        return pick_device(name)
    except RuntimeError as error:
        build = (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else
                 f"built for ROCm {torch.version.hip}" if torch.version.hip else
                 "built for Apple's MPS" if torch.backends.mps.is_built() else "CPU-only")
        raise UserError(f"--device {name} was asked for, but {error} (torch {torch.__version__}, "
                        f"{build}). Use --device cpu, or install the torch build for your GPU: see "
                        "README.md, 'Install'") from None


def train_and_write(args):
    """Train as the flags say, then write metrics.json, model.pt and the figures."""
    device = device_or_error(args.device)
    prepare_output_dir(args.output_dir)  # fail now, not after training
    raw = fetch_mnist(args.data_dir)
    if args.validation_size >= len(raw["train"][1]):  # parse_args checked the rest
        raise UserError(f"--validation-size {args.validation_size} leaves no digits to train on; "
                        f"choose fewer than {len(raw['train'][1]):,}")
    try:
        model, metrics = train_model(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule=args.lr_schedule,
            max_shift=args.max_shift, dropout=args.dropout, validation_size=args.validation_size,
            seed=args.seed, data_dir=args.data_dir, device=device.type, dry_run=args.dry_run)
    except FloatingPointError as error:  # the loss diverged
        raise UserError(f"{error}. Try a smaller --lr, such as 1e-3.", exit_code=1) from None
    # model.pt holds the normalization beside the weights, so that the two cannot be parted.
    saved = {"weights": {key: value.cpu() for key, value in model.state_dict().items()},
             **metrics["normalization"]}
    write_reports(args.output_dir, {**draw_reports(model, metrics, raw),
                                    "model.pt": saved, "metrics.json": metrics})
    print(f"trained and scored in {metrics['seconds']:.1f} s; the reports are in {args.output_dir}")
    return metrics


def main(argv=None):
    """`python mnist.py ...` in a shell, `%run mnist.py ...` in a notebook, or main([...])."""
    args = parse_args(command_line_flags() if argv is None else argv)
    in_notebook = "ipykernel" in sys.modules
    # Until main returns: Windows' redirected output (cp1252 in the West) has no 数: print \u6570.
    streams = [(stream, stream.errors) for stream in (sys.stdout, sys.stderr)
               if hasattr(stream, "reconfigure") and not in_notebook]
    for stream, _ in streams:
        stream.reconfigure(errors="backslashreplace")
    figures_before = set(plt.get_fignums())
    try:
        result = (predict_files(args.predict, args.output_dir, args.device) if args.predict
                  else train_and_write(args))
        backend = matplotlib.get_backend().lower()
        # No display (ssh, Docker), or Colab's `!python` (inline, but no notebook): nothing to show.
        no_window = "inline" in backend or backend in "agg cairo pdf pgf ps svg template".split()
        if args.show and not in_notebook and no_window:
            print(f"--show: no window can open here (matplotlib's backend is {backend}); the "
                  f"figures are PNG files in {args.output_dir}", file=sys.stderr)
        elif args.show and not in_notebook:
            plt.show()  # waits until you close the windows
        return result
    except UserError as error:
        print(f"mnist.py: error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        print(f"\nmnist.py: interrupted; each file in {args.output_dir} is whole, old or new",
              file=sys.stderr)
        raise SystemExit(130) from None  # 128 + 2, the number of SIGINT: the shell's convention
    finally:
        for stream, errors in streams:
            stream.reconfigure(errors=errors)
        if not in_notebook:  # a notebook shows the new figures below the cell, then closes them
            for number in set(plt.get_fignums()) - figures_before:
                plt.close(number)


# %% Run: the last cell. In a notebook, the kernel's own flags are ignored (command_line_flags).
if __name__ == "__main__":
    main()
