"""Teach a small neural network to read handwritten digits (MNIST): a lesson in one file.

    pip install -r requirements.txt   # README.md, "Install", says which torch suits you
    python mnist.py                   # downloads MNIST (11 MB) once, trains, writes outputs/

Part 1, the core, is the original recipe, whole: train_original() scores about 97.8% on the test
set, and copied alone into a notebook, it runs. Part 2 improves it one measured step at a time,
up to train_model(), which `python mnist.py` runs: about 98.4% on the test set, in 10 to 20
seconds on a 2-core CPU (docs/RESULTS.md). A first read skips Part 3, the command-line tool.
"""

# %% 1. Imports, and the device
import functools  # cache: keep what a function returned, to give it again
import math       # log
import time       # each epoch's seconds

import matplotlib.pyplot as plt  # figures
import seaborn as sns            # the confusion matrix's heatmap
import torch                     # tensors, and how to learn them
import torch.nn as nn            # the network's layers
import torch.nn.functional as F  # the loss, as a function
import torchvision               # downloads and reads MNIST's files
from sklearn.metrics import classification_report, confusion_matrix  # scores per digit

# A *device* is where numbers live and arithmetic runs: the CPU, or a GPU that does many at once
# ("cuda": NVIDIA's, or AMD's with torch's ROCm build; "mps": Apple's).

def pick_device(name="auto"):
    """torch.device(name); for "auto", a GPU if torch finds one, else the CPU."""
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


# %% 2. The data
# MNIST holds 70,000 handwritten digits, each a 28 x 28 grey image with its label, 0 to 9: 60,000
# to train on, and 10,000 to test on, by people who wrote none of the training digits. torch holds
# them in *tensors*, arrays of numbers with a shape: the training images are one tensor of shape
# (60000, 28, 28). A network can learn its training digits by heart and still read new ones
# badly: it *overfits*. The test set tells, once, at the very end, how well the finished model
# reads digits it has never seen; settings chosen by it would slowly fit those 10,000 digits, and
# flatter the model. So we hold out 5,000 training digits, the *validation* set, to choose by.

@functools.cache  # a split is read from disk once, however many runs in one session ask for it
def load_split(data_dir, split):
    """MNIST's "train" or "test" split as stored: images (N, 28, 28) of bytes 0-255, labels (N,)."""
    # download=True: fetch the four .gz files into data_dir/MNIST/raw/ and unpack them, once.
    dataset = torchvision.datasets.MNIST(data_dir, train=split == "train", download=True)
    return dataset.data, dataset.targets


def load_mnist(data_dir, validation_size, device):
    """The splits, {name: (images, labels)} on the device, and the training pixels' mean and
    std. With validation_size 0 there is no "validation" split."""
    images, labels = load_split(data_dir, "train")  # (60000, 28, 28), (60000,)
    if not 0 <= validation_size < len(images):
        raise ValueError(f"validation_size must be 0 to {len(images) - 1}, not {validation_size}")
    # With a *seed*, a random generator draws the same numbers every time: the same held-out digits.
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
    # nothing about the other digits leaks into training. The data moves to the device once; div_
    # and sub_ change it in place, with no copy (a trailing _ says so).
    pixels = {name: split[0].to(device).float().div_(255) for name, split in splits.items()}
    std, mean = torch.std_mean(pixels["train"])  # torch returns std first
    mean, std = mean.item(), std.item()  # .item() turns a one-number tensor into a float
    normalized = {name: (pixels[name].sub_(mean).div_(std), split[1].to(device))
                  for name, split in splits.items()}
    return normalized, (mean, std)


# %% 3. The model
# A *unit* (a "neuron") computes one number: a weighted sum of its inputs plus a bias. In a
# *fully connected* layer every unit sees every input: nn.Linear(784, 128) holds a weight matrix
# W of 128 x 784 and a bias vector b of 128, and turns a digit x (784 pixels) into W x + b. The
# weights and biases are the network's *parameters*, the numbers that training adjusts. Between
# layers sits ReLU(z) = max(0, z); without it two layers would collapse into one, as W2 (W1 x +
# b1) + b2 is just another W x + b. A stack of such layers is a multi-layer perceptron, an MLP.
# In torch a network is an nn.Module, whose method forward computes the output for a *batch* of
# B digits at once (shapes below are (B, ...)); nn.Sequential applies its layers in turn.
# *Dropout* fights overfitting: in training it sets each unit's output to 0 with probability 0.2,
# drawn anew for every digit each time, so that the network cannot lean on any one unit, and
# multiplies the others by 1 / (1 - 0.2) = 1.25 to keep each unit's expected output.
# The last layer gives ten *logits*, one score per digit, any real number: the larger, the more
# the network favours that digit. *Softmax* turns them into probabilities that sum to 1:
# p_i = e^(z_i) / (e^(z_0) + ... + e^(z_9)). The *loss* is one number that says how wrong the
# network is; training lowers it. *Cross-entropy* loss is -ln(p of the right digit): 0 when the
# network is sure and right, growing without limit as that p goes to 0, and -ln(1/10) = 2.30 for
# a network equally unsure of all ten. The model stops at the logits: F.cross_entropy applies
# softmax itself, computing ln(p) straight from the logits, which stays accurate where p is tiny.

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


# %% 4. Batches
# Training takes its steps on *mini-batches* of B digits (64 in the original recipe). An *epoch* is
# one pass over all the training digits, in a new random order each time: 55,000 / 64 rounds up
# to 860 steps. torch's DataLoader makes batches of a Dataset's items, read one at a time, in
# parallel if asked: the tool for data that does not fit in memory. MNIST fits (220 MB as floats),
# so a batch is simply the digits at B shuffled indices: simpler, and faster (docs/RESULTS.md).

def shuffled_batches(images, labels, batch_size, generator):
    """One epoch of (images (B, 28, 28), labels (B,)) batches; the last may be smaller."""
    # `yield` hands out a batch each time the loop asks. The order is drawn on the CPU, so that a
    # seed gives the same batches on any device.
    order = torch.randperm(len(images), generator=generator).to(images.device)
    for start in range(0, len(images), batch_size):
        indices = order[start:start + batch_size]
        yield images[indices], labels[indices]  # (B, 28, 28), (B,)


# %% 5. Training: one epoch of steps
# A training *step*: a batch of digits goes in and logits come out (the *forward pass*), the loss
# measures how wrong they are, and the parameters move a little to lower it. torch records the
# forward pass as a *graph*: which numbers each operation combined into which. loss.backward()
# walks the graph backwards with the chain rule of calculus, and stores in each parameter's .grad
# its *gradient*: how fast the loss changes as that parameter changes. An *optimizer* then moves
# every parameter against its gradient, downhill. Stochastic gradient descent (SGD: stochastic, as
# each step sees a random sample of the digits) does w <- w - lr * gradient: the *learning rate*
# lr sets the step's size. Adam (Kingma and Ba, 2015), the original recipe's optimizer, keeps two
# running averages for each parameter, of its gradient and of its gradient squared, and moves it
# by lr times the first over the square root of the second: usually about lr or less (section 10).

def train_one_epoch(model, batches, optimizer):
    """A step for each batch. Returns the mean loss and accuracy over every digit, as it went."""
    model.train()  # dropout on
    loss_sum, correct, seen = 0, 0, 0
    for images, labels in batches:
        logits = model(images)                  # (B, 10)
        loss = F.cross_entropy(logits, labels)  # the mean over the batch
        optimizer.zero_grad()  # backward() adds to .grad, so clear the last step's gradients
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)  # detach(): the number, without its graph
        correct += (logits.argmax(dim=1) == labels).sum()  # argmax: where each row is largest
        seen += len(labels)
    return loss_sum.item() / seen, correct.item() / seen


# %% 6. Evaluation, after each epoch
# To measure, switch dropout off (model.eval()) and gradients off (torch.no_grad()): with no
# backward() to come, torch records no graph, which saves memory and time. Each epoch trains on
# every training digit once, then scores the validation digits. The train numbers are averages
# taken while the weights still move, with dropout on, so train accuracy can sit below validation
# accuracy. If validation stops improving while training keeps improving, the model has begun to
# overfit. A loss grown to NaN ("not a number": every <, <= or == with it is false) has *diverged*.

@torch.no_grad()
def evaluate(model, images, labels):
    """{"loss", "accuracy", "predictions": (N,), "confidences": (N,)}; the last two on the CPU."""
    model.eval()
    # 1,000 digits at a time, so that the hidden layers' outputs for all N are never held at once.
    logits = torch.cat([model(chunk) for chunk in images.split(1000)])  # (N, 10)
    confidences, predictions = logits.softmax(dim=1).max(dim=1)  # each row's largest, and where
    return {"loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (predictions == labels).sum().item() / len(labels),
            "predictions": predictions.cpu(), "confidences": confidences.cpu()}


def train_and_validate(model, optimizer, epoch_batches, epochs, validation):
    """Train, printing a line per epoch; return a row per epoch. validation: (images, labels)."""
    history = []
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        train_loss, train_accuracy = train_one_epoch(model, epoch_batches(), optimizer)
        if not train_loss < 10 * math.log(10):  # NaN, or 10 times a guess's loss (section 3)
            raise FloatingPointError(f"the training loss reached {train_loss:.3g} in epoch {epoch}:"
                                     " training has diverged; the learning rate is too high?")
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy}
        line = f"epoch {epoch:>3}  train loss {train_loss:.4f} accuracy {train_accuracy:6.2%}"
        if validation is not None:
            scores = evaluate(model, *validation)
            row.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
            line += f"  validation loss {scores['loss']:.4f} accuracy {scores['accuracy']:6.2%}"
        history.append({**row, "seconds": time.perf_counter() - started})
        print(f"{line}  {history[-1]['seconds']:.2f} s")
    return history


# %% 7. The test set, scored once
# Only now, with every choice made, do we look at the test digits, once; the training digits are
# scored again too, with dropout off. Per digit d: *precision*, the share of the digits read as d
# that were d; *recall*, the share of the true d's read as d; F1 = 2pr / (p + r), high only if both
# are; support, the number of test d's. The last rows average them, plainly and weighted by
# support. The *confusion matrix* counts test digits by true digit (rows) and prediction
# (columns): off its diagonal are the mistakes, of which the 25 surest are kept, to look at.

def final_scores(model, splits):
    """Score every split, print the test set's report, and return the scores."""
    results = {name: evaluate(model, *split) for name, split in splits.items()}
    test, truth = results["test"], splits["test"][1].cpu()
    predictions, confidences = test["predictions"], test["confidences"]
    every_digit = dict(labels=range(10), zero_division=0)  # ten rows, present or not; 0/0 is 0
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


# %% 8. The original recipe, whole
# Adam at a learning rate of 1e-3, batches of 64, 10 epochs: the write-up reported 97.85% on the
# test set. plot_confusion_matrix(metrics["confusion_matrix"]) draws it (a script: plt.show()).

def train_original(epochs=10, batch_size=64, lr=1e-3, dropout=0.2, validation_size=5000, seed=0,
                   data_dir="data", device="auto"):
    """Train the MLP, validating after each epoch; score the test set once. (model, metrics)."""
    device = pick_device(device)
    # The seed fixes the first weights and the dropout, the generator the batches: a run repeats
    # exactly on the same machine with the same torch (a GPU, or another CPU, rounds differently).
    torch.manual_seed(seed)
    splits, _ = load_mnist(data_dir, validation_size, device)
    model = MLP(dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = train_and_validate(
        model, optimizer, lambda: shuffled_batches(*splits["train"], batch_size, generator),
        epochs, splits.get("validation"))
    return model, {"history": history, **final_scores(model, splits)}


# Part 2. Better, one measured step at a time ===================================================
# Each section adds a check or an improvement to the original recipe, with what it earns. The
# original recipe validates at 97.34% (the mean over five seeds; docs/RESULTS.md), and 97.29% in
# batches of 256 (section 14); add a schedule, 97.70%; add shifts, 97.86%, train_model's.

# %% 9. Look before you train
import copy                # deepcopy: copies of objects
import numpy as np         # arrays, to prepare your own images
from PIL import Image      # opens and resizes images
from scipy import ndimage  # finds the separate marks in an image

# Many bugs show before training: print the splits' shapes and the pixels' range, look at some
# digits and their labels, and score the untrained network. nn.Linear starts its weights small and
# random, so softmax gives each digit about 1/10, and the loss is about ln(10) = 2.30; far above,
# the network starts confidently wrong: look for a bug (README exercise 6 makes one). Seed 0 prints:
#   loss before training: 2.307 (a guess scores ln(10) = 2.303)

def describe_data(splits, mean, std):
    """Print each split's shapes and the training pixels' range."""
    for name, (images, labels) in splits.items():
        print(f"{name:>10}: images {tuple(images.shape)} {images.dtype}, "
              f"labels {tuple(labels.shape)} {labels.dtype}")
    low, high = splits["train"][0].aminmax()
    print(f"pixels: 0-255 in the files, scaled to [0, 1] and standardized with the training "
          f"mean {mean:.4f} and std {std:.4f}: now {low:.2f} to {high:.2f}")


def plot_grid(images, titles, title, columns):
    """Small images in a grid, each under its title, white ink on black as the network sees it."""
    rows = max(1, math.ceil(len(images) / columns))  # one, if there are none to show
    height = 1.5 * rows + 0.8  # inches: 1.5 for each row of images, 0.8 for the title
    figure, grid = plt.subplots(rows, columns, figsize=(1.4 * columns + 0.4, height), squeeze=False)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.8 / height)
    for axes in grid.flat:
        axes.axis("off")
    for axes, image, text in zip(grid.flat, images, titles):
        axes.imshow(np.asarray(image), cmap="gray")
        axes.set_title(text, fontsize=9)
    figure.suptitle(title)
    return figure


@torch.no_grad()
def loss_before_training(model, images, labels):
    """Print the untrained model's mean loss, with dropout off."""
    loss = F.cross_entropy(model.eval()(images), labels).item()
    print(f"loss before training: {loss:.3f} (a guess scores ln(10) = {math.log(10):.3f})")


# %% 10. One digit, one step
# One training digit goes through a copy of the network, whose copied optimizer takes a step.
# Adam keeps two averages per weight, of its gradient g and of g^2: each step keeps 0.9 (beta1) and
# 0.999 (beta2) of the old one and takes the rest from the new g (or g^2). As they start at 0, Adam
# divides them by 1 - 0.9^t and 1 - 0.999^t at step t, giving m and v, and moves the weight by -lr *
# m / (sqrt(v) + 1e-8). At the first step m = g and v = g^2: a move of lr against the gradient,
# unless g is tiny; train_model traces at its lr, before the schedule (section 11). Seed 0 prints:
#   one training digit (label 8), through a copy of the model with dropout off:
#     logits          0.16  -0.05   0.10   0.17   0.19   0.06  -0.20   0.03  -0.07  -0.03
#     probabilities  0.112  0.091  0.106  0.114  0.116  0.102  0.079  0.098  0.089  0.093
#     loss -ln(p[8]) = -ln(0.089) = 2.414
#     the first layer's largest gradient, -0.097338: unit 73's weight for pixel 158, now -0.024416
#     Adam's first step, at lr = 0.003000, moves it by +0.003000 to -0.021416

def trace_one_digit(model, optimizer, image, label):
    """Print one digit's logits, probabilities and loss, and the step on its largest gradient."""
    model, optimizer = copy.deepcopy((model, optimizer))  # the copied optimizer moves the copy
    logits = model.eval()(image[None])[0]  # [None] adds a batch dimension: (1, 28, 28), (1, 10)
    probabilities = logits.softmax(dim=0)  # (10,), summing to 1
    loss = F.cross_entropy(logits[None], label[None])  # -ln(probabilities[label])
    loss.backward()
    weights = model.layers[1].weight  # (128, 784), a row per unit; .view flattens a conv's filters
    rows, gradients = weights.view(len(weights), -1), weights.grad.view(len(weights), -1)
    unit = gradients.abs().amax(dim=1).argmax().item()  # the unit of the gradient largest in size,
    pixel = gradients[unit].abs().argmax().item()       # and which pixel's weight it is
    before, gradient = rows[unit, pixel].item(), gradients[unit, pixel].item()
    optimizer.step()
    after, digit, lr = rows[unit, pixel].item(), label.item(), optimizer.param_groups[0]["lr"]
    print(f"one training digit (label {digit}), through a copy of the model with dropout off:\n"
          f"  logits        {' '.join(f'{z:6.2f}' for z in logits.tolist())}\n"
          f"  probabilities {' '.join(f'{p:6.3f}' for p in probabilities.tolist())}\n"
          f"  loss -ln(p[{digit}]) = -ln({probabilities[digit]:.3f}) = {loss.item():.3f}\n"
          f"  the first layer's largest gradient, {gradient:+.6f}: unit {unit}'s weight for pixel "
          f"{pixel}, now {before:+.6f}\n  {type(optimizer).__name__}'s first step, at lr = "
          f"{lr:.6f}, moves it by {after - before:+.6f} to {after:+.6f}")
    return probabilities, (before, gradient, after)


# %% 11. A schedule for the learning rate: +0.4 points
# A *schedule* sets the learning rate anew for every step. "One-cycle" starts at lr / 25, rises to
# lr over the first 15% of the steps, then falls to almost 0, both along a cosine curve. At first
# the weights are random and Adam's averages rest on few gradients, yet Adam moves each weight by
# about the rate: the low start keeps these poorly aimed steps small. Big steps then cover ground,
# and tiny ones settle into a low point. The peak alone earns nothing: with shifts, constant rates
# of 1e-3 and 3e-3 score 97.46% and 97.47%; one-cycle up to 3e-3, 97.86%.

def schedule_rates(optimizer, schedule, lr, total_steps):
    """Set each step's rate, "one-cycle" or "constant"; return the rates, as a list that grows."""
    if schedule == "constant":
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    else:  # lr / 25 is OneCycleLR's default start; cycle_momentum=False keeps Adam's beta1 at 0.9
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15, cycle_momentum=False)
    rates = []

    # A *hook*: torch calls it after every step, with the optimizer and step()'s arguments; so
    # section 5's loop stays as it is.
    def next_rate(optimizer, args, kwargs):
        rates.append(scheduler.get_last_lr()[0])  # the rate this step used
        scheduler.step()
    optimizer.register_step_post_hook(next_rate)
    return rates


def plot_training_curves(history, rates):
    """Loss and accuracy per epoch, for training and validation; and each step's rate."""
    figure, all_axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    epochs = [row["epoch"] for row in history]
    for axes, measure in zip(all_axes, ("loss", "accuracy")):
        for key, label in (("train", "train (while training)"), ("val", "validation")):
            if f"{key}_{measure}" in history[0]:
                axes.plot(epochs, [row[f"{key}_{measure}"] for row in history], "o-", label=label)
        axes.set(xlabel="epoch", title=measure)
        axes.legend()
    all_axes[2].plot(range(1, len(rates) + 1), rates)
    all_axes[2].set(xlabel="step", ylabel="learning rate", title="the schedule, per step")
    return figure


# %% 12. Random shifts: +0.16 points
# A 7 moved by a pixel is still a 7, but to a fully connected network every pixel is a separate
# input, so it must be shown moved digits to learn that: an *augmentation*, new training examples
# that keep their labels. Up to two pixels each way are too many, in 10 epochs: 97.56%.

def shift_randomly(images, max_shift, background, generator):
    """Move each digit by up to max_shift pixels each way, every move equally likely; background,
    a black pixel's value after standardizing, fills what a move uncovers. (B, 28, 28)."""
    s = max_shift
    if s == 0:
        return images
    padded = F.pad(images, (s, s, s, s), value=background)  # (B, 28 + 2s, 28 + 2s)
    # Each digit keeps the 28 x 28 window of its padded self at row y and column x, drawn at
    # random: it moves s - y pixels down and s - x right (less than 0: up, or left).
    ys, xs = torch.randint(0, 2 * s + 1, (2, len(images)), generator=generator).to(images.device)
    shifted = torch.empty_like(images)
    for y in range(2 * s + 1):
        for x in range(2 * s + 1):
            chosen = (ys == y) & (xs == x)  # the digits that drew this window
            shifted[chosen] = padded[chosen, y:y + 28, x:x + 28]
    return shifted


# %% 13. Your own handwriting
# A model knows only data like its training data; data unlike it is a *distribution shift*. MNIST
# stores ink as high values on 0 (pictures show it white on black), scaled so that the longer side
# is 20 pixels with soft grey edges, and placed with its centre of mass (the ink-weighted mean
# position) in the middle of the 28 x 28 field. So train_model's network reads 11% of 300 printed
# digits (docs/own_digits.py) resized to 28 x 28, and 95% prepared as MNIST's were.

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
    # The digit is every mark (touching pixels over 0.3, above the noise) with at least a tenth
    # of the largest mark's ink: a speck of dust or a stray dot would widen its box.
    marks, count = ndimage.label(ink > 0.3, structure=np.ones((3, 3)))  # diagonals touch too
    amounts = ndimage.sum_labels(ink, marks, range(1, count + 1))  # each mark's ink
    rows, columns = np.nonzero(np.isin(marks, 1 + np.flatnonzero(amounts >= amounts.max() / 10)))
    box = ink[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    # Its longer side to 20 pixels: Lanczos blends neighbours into soft grey edges (and overshoots).
    scale = 20 / max(box.shape)
    size = (max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale)))  # PIL: (w, h)
    box = np.asarray(Image.fromarray(box).resize(size, Image.Resampling.LANCZOS)).clip(0, 1)
    # Put its centre of mass on pixel (14, 14), as in MNIST; paste() crops what falls outside.
    height, width = box.shape
    top = round(14 - (box.sum(axis=1) * np.arange(height)).sum() / box.sum())
    left = round(14 - (box.sum(axis=0) * np.arange(width)).sum() / box.sum())
    field = Image.new("F", (28, 28))  # mode F: a float per pixel, all 0 (black)
    field.paste(Image.fromarray(box), (left, top))
    return torch.from_numpy(np.array(field))  # (28, 28)


@torch.no_grad()
def predict(model, digits, mean, std):
    """Digits (N, 28, 28) in [0, 1] -> each digit's ten probabilities (N, 10), on the CPU."""
    digits = digits.to(next(model.parameters()).device)  # where the model is: CPU or GPU
    return model.eval()((digits - mean) / std).softmax(dim=1).cpu()  # standardized as in training


# %% 14. The recipe: the original, and every step above
# Batches of 256 (as good as 64 on validation, in just over half the time), one-cycle up to
# 3e-3, shifts of up to one pixel, and the checks: `python mnist.py` runs it, and scores the test
# set once, as the final run of a recipe chosen on validation: about 98.4%. Dropout, honestly,
# stays only as the original has it: without it, validation rises to 98.21%, shifts regularizing
# enough in 10 epochs; it earns 1.2 points where a network overfits (README exercise 10).

def train_model(epochs=10, batch_size=256, lr=3e-3, lr_schedule="one-cycle", max_shift=1,
                dropout=0.2, validation_size=5000, seed=0, data_dir="data", device="auto",
                dry_run=False):
    """Train the MLP on MNIST and score it once on the test set. Returns (model, metrics).
    dry_run=True, a quick check: 1 epoch of 3 batches, and 1,000 validation and test digits."""
    started, settings = time.perf_counter(), dict(locals())  # locals(): every argument, by name
    device, epochs = pick_device(device), 1 if dry_run else epochs
    settings.update(epochs=epochs, device=str(device), torch_version=torch.__version__)
    print("settings: " + " ".join(f"{key}={value}" for key, value in settings.items()))
    torch.manual_seed(seed)  # as in train_original
    splits, (mean, std) = load_mnist(data_dir, validation_size, device)
    if dry_run:  # as the docstring says
        splits = {name: (images[:size], labels[:size]) for (name, (images, labels)), size in
                  zip(splits.items(), [3 * batch_size, 1000, 1000])}
    describe_data(splits, mean, std)
    model = MLP(dropout).to(device)
    print(f"{model}\nparameters: {sum(weights.numel() for weights in model.parameters()):,}")
    train_images, train_labels = splits["train"]
    loss_before_training(model, train_images[:1000], train_labels[:1000])  # a steady mean
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trace_one_digit(model, optimizer, train_images[0], train_labels[0])
    total_steps = epochs * math.ceil(len(train_images) / batch_size)  # 2,150 by default
    rates = schedule_rates(optimizer, lr_schedule, lr, total_steps)
    generator = torch.Generator().manual_seed(seed)

    def epoch_batches():  # section 4's batches, each digit shifted; -mean / std is black
        for images, labels in shuffled_batches(train_images, train_labels, batch_size, generator):
            yield shift_randomly(images, max_shift, -mean / std, generator), labels
    history = train_and_validate(model, optimizer, epoch_batches, epochs, splits.get("validation"))
    metrics = {"settings": settings, "normalization": {"mean": mean, "std": std},
               "history": history, **final_scores(model, splits), "learning_rates": rates}
    return model, {**metrics, "seconds": time.perf_counter() - started}


# Part 3. The command-line tool ===============================================================
# What a tool needs besides the lesson: flags, reports written whole, your images read from files,
# a GPU tested before it is trusted, and a one-line error for each mistake a user can fix. A
# first read skips it: main(), at the end, runs train_model or reads your images with its model.

# %% 15. The tool's imports, its errors, and the reports
import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path

from PIL import ImageOps

NO_WINDOWS = "agg cairo pdf pgf ps svg template".split()  # matplotlib's backends with no window


class UserError(Exception):
    """A problem the user can fix, such as a blank image: main() prints UserError(message) in one
    line and exits with 2 (bad input), or with 1 for UserError(message, 1) (anything else)."""


def plot_first_layer(model):
    """first_layer.png: each first-layer unit's weights, a row of (128, 784), as a picture."""
    # Red where ink raises the unit, blue where it lowers it. Look for stroke-like detectors, and a
    # speckled border: a border pixel is black in nearly every digit, so a unit's border weights
    # all get nearly the same gradient (about -0.42 times its bias's): they move together, and keep
    # only the random differences they started with.
    weights = model.layers[1].weight.detach().cpu()
    weights = weights.view(len(weights), -1)  # exercise 8's 32 filters of 3 x 3: (32, 9)
    side = math.isqrt(weights.shape[1])
    tiles = (weights / weights.abs().amax(dim=1, keepdim=True)).view(-1, 1, side, side)
    mosaic = torchvision.utils.make_grid(tiles, nrow=16, padding=1, pad_value=float("nan"))[0]
    figure, axes = plt.subplots(figsize=(9.6, 0.6 * math.ceil(len(tiles) / 16) + 0.5),
                                layout="constrained")
    axes.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axes.set(title=f"The {len(tiles)} first-layer units' weights: what each one looks for")
    axes.axis("off")
    return figure


def draw_reports(model, metrics, raw):
    """Every figure of a training run, by file name. raw: fetch_mnist's digits, as stored."""
    (train_images, train_labels), (test_images, _) = raw["train"], raw["test"]
    mistakes, history = metrics["mistakes"], metrics["history"]
    return {"digits.png": plot_grid(train_images[:40], train_labels[:40].tolist(), "The first "
                                    "digits in MNIST's training file, and their labels", 10),
            "training_curves.png": plot_training_curves(history, metrics["learning_rates"]),
            "confusion_matrix.png": plot_confusion_matrix(metrics["confusion_matrix"]),
            "misclassified.png": plot_grid(
                test_images[[mistake["index"] for mistake in mistakes]],
                [f"{m['label']} → {m['predicted']} ({m['confidence']:.0%})" for m in mistakes],
                f"Test digits the model got wrong ({len(mistakes)} shown, the most confident "
                "first):\ntrue → predicted (confidence)", 5),
            "first_layer.png": plot_first_layer(model)}


def write_reports(output_dir, contents):
    """Write each figure (.png), model (.pt) or dict (.json) whole, or not at all: first into a
    temporary file, which os.replace then moves into the report's place in one step."""
    for name, content in contents.items():
        path, temporary = output_dir / name, output_dir / f".{name}.partial"
        try:
            if name.endswith(".png"):
                content.savefig(temporary, format="png", dpi=100)
            elif name.endswith(".pt"):
                torch.save(content, temporary)
            else:
                temporary.write_text(json.dumps(content, indent=2) + "\n")
            os.replace(temporary, path)
        except OSError as error:  # on Windows, a file held open (an image viewer, OneDrive)
            raise UserError(f"cannot write {path} ({error.strerror}); if another program holds "
                            "it open, close it and run again", 1) from None
        finally:
            temporary.unlink(missing_ok=True)


def prepare_output_dir(output_dir):
    """Fail now, before training, if the reports could not be written later."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise UserError(f"cannot write to --output-dir {output_dir} ({error.strerror}); give a "
                        "folder you can write to") from None


# %% 16. MNIST's files, your images, and the trained model

def fetch_mnist(data_dir):
    """MNIST's splits as stored (load_split), or a one-line error: where to put which files, or
    that they are not MNIST's."""
    folder = (Path(data_dir) / "MNIST" / "raw").resolve()
    try:  # no network, HTTP 403, a damaged file or IDX header, a folder that is a file...
        stored = {split: load_split(data_dir, split) for split in ("train", "test")}
    except (RuntimeError, OSError, ValueError, TypeError, AssertionError) as error:  # torchvision's
        lines = str(error).strip().splitlines() or [type(error).__name__]  # torchvision's reason
        names = ", ".join(name[:-3] for name, _ in torchvision.datasets.MNIST.resources)  # no .gz
        dotted = ", ".join(sorted(path.name for path in folder.glob("*.idx?-ubyte")))  # unpacked so
        rename = f" Rename {dotted}: a hyphen, not a dot, before idx." if dotted else ""
        raise UserError(f"could not load MNIST ({' '.join(dict.fromkeys([lines[0], lines[-1]]))}). "
                        f"Put the four files {names}, packed (.gz) or unpacked, into {folder}, or "
                        "point --data-dir at the folder that holds MNIST/raw/; delete a file there "
                        f"that is damaged, and run again.{rename}", 1) from None
    # torchvision reads any 3-D IDX file of bytes: are these MNIST's? (t10k: its test files.)
    for prefix, (images, labels) in zip(("train", "t10k"), stored.values()):
        size = " x ".join(map(str, images.shape[1:]))
        if size != "28 x 28" or not len(images) == len(labels) > 0 or labels.min() < 0 or \
                labels.max() > 9:
            raise UserError(f"{folder} holds {len(images):,} {prefix} images of {size} pixels and "
                            f"{len(labels):,} labels {labels.unique().tolist()[:10]}: not "
                            f"MNIST's. Delete its {prefix}-* files and run again.")
    return stored


def image_files(path):
    """[path] for a file; for a folder, the images in it that Pillow can open, sorted."""
    if not path.exists():
        raise UserError(f"{path} does not exist; give an image file, or a folder of them")
    # Not the formats that Pillow can only save, such as PDF, nor hidden files: macOS leaves
    # ._name.png metadata files on exFAT and network drives.
    readable = {suffix for suffix, kind in Image.registered_extensions().items()
                if kind in Image.OPEN}
    files = [path] if path.is_file() else sorted(
        file for file in path.iterdir() if file.is_file() and not file.name.startswith(".")
        and file.suffix.lower() in readable)
    if not files:
        raise UserError(f"{path} is a folder with no image files in it; give PNG or JPEG files")
    return files


def read_digit(path):
    """The digit in an image file, upright and prepared (prepare_digit)."""
    try:
        with Image.open(path) as image:  # phones store photos sideways, with an EXIF note:
            image = ImageOps.exif_transpose(image)  # an upright copy, read whole (or failing) now
        if image.mode.startswith("I"):  # 16-bit grey, as scanners save it: 0-65535, made 0-255
            image = Image.fromarray((np.asarray(image) / 257).clip(0, 255).round().astype(np.uint8))
        return prepare_digit(image, name=path)
    except (OSError, Image.DecompressionBombError):  # not an image, cut short, too large...
        raise UserError(f"{path} is not an image that Pillow can read; give a PNG or JPEG file "
                        "of one digit") from None
    except ValueError as error:  # no ink to read (or a value that Pillow refused)
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
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = MLP()
        model.load_state_dict(saved["weights"])  # an error if the layers differ
        return model, (float(saved["mean"]), float(saved["std"]))
    except Exception:  # not torch's file, cut short, unreadable, another network, no mean...
        raise UserError(f"{path} does not hold this script's network with its normalization: "
                        f"train again with 'python mnist.py --output-dir {output_dir}'") from None


def predict_files(paths, output_dir, device):
    """Print the digit read in each image; draw them as the network sees them."""
    model, (mean, std) = load_trained_model(output_dir)  # so output_dir exists
    files = [file for path in paths for file in image_files(path)]
    # Every image is prepared before any is predicted: bad input stops the run with one line.
    digits = torch.stack([read_digit(file) for file in files])
    confidences, predicted = predict(model.to(device), digits, mean, std).max(dim=1)
    read = [f"{digit} ({confidence:.1%})" for digit, confidence in zip(predicted, confidences)]
    for file, answer in zip(files, read):
        print(f"{file}: {answer}")  # for example "my-seven.png: 7 (99.2%)"
    titles = [f"{file.stem[:16]}\n{answer}" for file, answer in zip(files, read)]
    write_reports(output_dir, {"predictions.png": plot_grid(
        digits, titles, "Your digits as the network sees them", min(8, len(files)))})
    print(f"wrote {output_dir / 'predictions.png'}", file=sys.stderr)  # stdout: the digits alone
    return predicted, confidences


# %% 17. Flags, the device, and main()

def checked(kind, valid, words):
    """An argparse type: the text as a number of this kind, if valid(number) says so."""
    def parse(text):
        with contextlib.suppress(ValueError):  # text that is no number of this kind at all
            if valid(kind(text)):  # every <, <= or == with nan is false: nan is never valid
                return kind(text)
        raise argparse.ArgumentTypeError(f"must be {words}, not {text!r}")
    return parse


def parse_args(argv):
    """The flags. Those of the recipe take train_model's defaults, read from its signature."""
    default = {name: p.default for name, p in inspect.signature(train_model).parameters.items()}
    parser = argparse.ArgumentParser(  # allow_abbrev=False: --epoch is an error, not a guess
        prog="mnist.py", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a small network on MNIST, or read your own digits with it. The original "
        "recipe: --lr 1e-3 --lr-schedule constant --max-shift 0 --batch-size 64.")
    # A bad flag gets one line, where argparse would print its whole usage block first.
    parser.error = lambda message: parser.exit(2, f"mnist.py: error: {message} (see --help)\n")
    count = checked(int, lambda n: 1 <= n <= 10**9, "a whole number from 1 to 10**9")
    rate = checked(float, lambda x: 0 < x < math.inf, "a positive finite number")
    chance = checked(float, lambda p: 0 <= p < 1, "at least 0 and below 1")
    seed = checked(int, lambda n: 0 <= n < 2**64, "a whole number from 0 to 2**64 - 1")
    for flag, help, more in [  # train_model's parameters, each a flag of the same name
            ("--epochs", "passes over the training digits", dict(type=count)),
            ("--batch-size", "digits per step", dict(type=count)),
            ("--lr", "(peak) learning rate of Adam", dict(type=rate)),
            ("--lr-schedule", "how the rate changes", dict(choices=["one-cycle", "constant"])),
            ("--max-shift", "shift by up to this many pixels", dict(type=int, choices=range(5))),
            ("--dropout", "dropout's probability (0: off)", dict(type=chance)),
            ("--validation-size", "digits held out to validate on (0: none)", dict(type=int)),
            ("--seed", "seed for weights, dropout and order", dict(type=seed)),
            ("--data-dir", "holds MNIST/raw/", {}),
            ("--device", "auto: a GPU that works, else the CPU",
             dict(choices=["auto", "cpu", "cuda", "mps"])),
            ("--dry-run", "1 epoch of 3 batches: a smoke test", dict(action="store_true"))]:
        parser.add_argument(flag, default=default[flag[2:].replace("-", "_")], help=help, **more)
    parser.add_argument("--predict", nargs="+", type=Path, metavar="IMAGE", help="read these "
                        "images (or folders of them) with the model in --output-dir, not train")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="for the reports")
    parser.add_argument("--show", action="store_true", help="also open the figures in windows")
    return parser.parse_args(argv)


def command_line_flags():
    """sys.argv's flags, but not a notebook kernel's own (-f kernel.json; %run sets others)."""
    kernel_flags = any(flag == "-f" or flag.startswith("--f=") for flag in sys.argv[1:])
    return [] if "ipykernel" in sys.modules and kernel_flags else sys.argv[1:]


def device_or_error(name):
    """pick_device(name), once a small computation has run there. Where it fails: for "auto",
    the CPU, with a note; for a device named, the one-line error that names torch's build."""
    device = pick_device(name)
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    try:  # torch can list a GPU that it cannot use, such as one too old for this torch build
        if not found.get(device.type, True):
            raise RuntimeError(f"torch finds no {device.type} device here")
        torch.ones(1, device=device).add(1).item()  # .item() waits for it: errors show here
        return device
    except RuntimeError as error:  # its first sentence says what went wrong
        problem = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]
        if name == "auto":
            print(f"the {device.type} device failed a test step ({problem}); the run continues "
                  "on the CPU", file=sys.stderr)
            return torch.device("cpu")
        build = (f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
                 if torch.version.hip else "Apple's MPS" if torch.backends.mps.is_built() else None)
        raise UserError(f"--device {name} was asked for, but {problem} (torch {torch.__version__}, "
                        f"{f'built for {build}' if build else 'CPU-only'}). Use --device cpu, or "
                        "install the torch build for your GPU: see README.md, 'Install'") from None


def train_and_write(args, device):
    """Train as the flags say, then write metrics.json, model.pt and the figures."""
    prepare_output_dir(args.output_dir)  # fail now, not after training
    raw = fetch_mnist(args.data_dir)
    recipe = {name: getattr(args, name) for name in inspect.signature(train_model).parameters}
    try:
        model, metrics = train_model(**{**recipe, "device": device})
    except ValueError as error:  # load_mnist's check of the validation size
        raise UserError(f"{error}: choose another --validation-size") from None
    except FloatingPointError as error:  # the loss diverged
        raise UserError(f"{error}. Try a smaller --lr, such as 1e-3.", 1) from None
    # model.pt holds the normalization beside the weights, so that the two cannot be parted, and
    # CPU tensors, so that a model trained on a GPU loads on any machine.
    saved = {"weights": {key: value.cpu() for key, value in model.state_dict().items()},
             **metrics["normalization"]}
    write_reports(args.output_dir, {**draw_reports(model, metrics, raw), "model.pt": saved,
                                    "metrics.json": metrics})
    print(f"trained and scored in {metrics['seconds']:.1f} s; the reports are in {args.output_dir}")
    return metrics


def main(argv=None):
    """`python mnist.py ...` in a shell, `%run mnist.py ...` in a notebook, or main([...])."""
    args = parse_args(command_line_flags() if argv is None else argv)
    in_notebook = "ipykernel" in sys.modules
    for stream in (sys.stdout, sys.stderr):  # Windows' redirected output (cp1252) has no 数:
        if hasattr(stream, "reconfigure"):  # print \u6570 instead of failing
            stream.reconfigure(errors="backslashreplace")
    figures_before = set(plt.get_fignums())
    try:
        device = device_or_error(args.device)  # tested once per run
        result = (predict_files(args.predict, args.output_dir, device) if args.predict
                  else train_and_write(args, device))
        backend = plt.get_backend().lower()  # agg: no display (ssh, Docker); inline: `!python`
        if args.show and not in_notebook and ("inline" in backend or backend in NO_WINDOWS):
            print(f"--show: no window can open here (matplotlib's backend is {backend}); the "
                  f"figures are PNG files in {args.output_dir}", file=sys.stderr)
        elif args.show and not in_notebook:
            plt.show()  # waits until you close the windows
        return result
    except UserError as error:
        print(f"mnist.py: error: {error.args[0]}", file=sys.stderr)
        raise SystemExit(error.args[1] if len(error.args) > 1 else 2) from None
    except KeyboardInterrupt:
        print(f"\nmnist.py: interrupted; each file in {args.output_dir} is whole, old or new",
              file=sys.stderr)
        raise SystemExit(130) from None  # 128 + 2, the number of SIGINT: the shell's convention
    finally:
        if not in_notebook:  # a notebook shows the new figures below the cell, then closes them
            for number in set(plt.get_fignums()) - figures_before:
                plt.close(number)


# %% Run: the last cell. In a notebook, the kernel's own flags are ignored (command_line_flags).
if __name__ == "__main__":
    main()
