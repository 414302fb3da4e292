"""How much time does the way batches are made cost? One epoch of training, three ways.

    python docs/loaders.py          # about 1 minute on a 2-core CPU, after `python mnist.py`

Each way trains the same MLP with the same Adam and one-cycle schedule on the same 55,000
training digits at batch 256, each digit shifted at random by up to 1 pixel as mnist.py's
default does, then scores the 5,000 validation digits, for 3 epochs, and prints the median
seconds per epoch:
- tensors: mnist.py's way, batches sliced from normalized tensors held in memory;
- TensorDataset: DataLoader(TensorDataset(images, labels), batch_size=256, shuffle=True) over
  the same tensors, the everyday form that many courses use, with mnist.shift_randomly;
- classic: a DataLoader over torchvision's MNIST with per-image transforms (RandomCrop with
  1 pixel of padding, ToTensor, Normalize), the pipeline of most MNIST tutorials, which turns
  every digit into a PIL image, then a tensor, one digit at a time in Python, every epoch.
"""

import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist  # noqa: E402

EPOCHS, BATCH_SIZE, VALIDATION_SIZE = 3, 256, 5000


def classic_loader(data_dir, mean, std):
    """torchvision's MNIST with per-image transforms, over the training digits mnist.py uses."""
    transforms = torchvision.transforms
    dataset = torchvision.datasets.MNIST(data_dir, transform=transforms.Compose([
        transforms.RandomCrop(28, padding=1),  # pads with black, then cuts a random 28 x 28
        transforms.ToTensor(),  # PIL uint8 (28, 28) -> float (1, 28, 28) in [0, 1]
        transforms.Normalize([mean], [std])]))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    train = order[VALIDATION_SIZE:]  # as mnist.load_mnist splits them
    # num_workers=0: worker processes would compete with training for the same CPU cores.
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, train.tolist()),
                                       batch_size=BATCH_SIZE, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def shifted(loader, background, generator):
    """One epoch of the loader's batches, each shifted as mnist.py shifts them. loader: an
    iterable, or a function that gives one epoch's batches."""
    for batch_images, batch_labels in loader() if callable(loader) else loader:
        yield mnist.shift_randomly(batch_images, 1, background, generator), batch_labels


splits, (mean, std) = mnist.load_mnist("data", VALIDATION_SIZE, "cpu")
images, labels = splits["train"]
ways = {
    "tensors": functools.partial(shifted, functools.partial(
        mnist.shuffled_batches, images, labels, BATCH_SIZE, torch.Generator().manual_seed(0)),
        -mean / std, torch.Generator().manual_seed(1)),
    "TensorDataset": functools.partial(shifted, torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=True,
        generator=torch.Generator().manual_seed(0)), -mean / std,
        torch.Generator().manual_seed(1)),
    "classic": functools.partial(iter, classic_loader("data", mean, std)),
}
for name, epoch_batches in ways.items():
    torch.manual_seed(0)
    model = mnist.MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    mnist.schedule_rates(optimizer, "one-cycle", 3e-3, EPOCHS * -(-len(images) // BATCH_SIZE))
    seconds = []
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        mnist.train_one_epoch(model, epoch_batches(), optimizer)
        accuracy = mnist.evaluate(model, *splits["validation"])["accuracy"]
        seconds.append(time.perf_counter() - started)
    print(f"{name:>13}: {statistics.median(seconds):6.2f} s per epoch (median of {EPOCHS}), "
          f"validation accuracy {accuracy:.2%} after {EPOCHS} epochs")
