"""CI's end-to-end gate, run after `python mnist.py --epochs 10` on the real MNIST.

1. Every report file exists and is not empty.
2. The test accuracy in metrics.json is at least 0.975. This only catches breakage: a healthy
   run of the default recipe scores about 0.985.
3. model.pt holds the normalization that metrics.json reports, and, loaded into a fresh MLP,
   reproduces exactly the test accuracy and the confusion matrix that metrics.json reports, on
   test digits read here straight from the IDX file (not through mnist.py's or torchvision's
   loading code). A model trained on a GPU is checked
   here on the CPU, which adds numbers up in another order: --near-ties N lets up to N test
   digits, whose top two logits were nearly tied, come out the other way.

Usage: python .ci/check_outputs.py [OUTPUT_DIR] [DATA_DIR] [--gate 0.975] [--near-ties 0]
"""

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnist import MLP  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("output_dir", nargs="?", type=Path, default=Path("outputs"))
parser.add_argument("data_dir", nargs="?", type=Path, default=Path("data"))
parser.add_argument("--gate", type=float, default=0.975)
parser.add_argument("--near-ties", type=int, default=0)
args = parser.parse_args()
output_dir, raw, GATE = args.output_dir, args.data_dir / "MNIST" / "raw", args.gate

for name in ("metrics.json", "digits.png", "confusion_matrix.png", "training_curves.png",
             "misclassified.png", "first_layer.png", "model.pt"):
    path = output_dir / name
    if not path.is_file() or path.stat().st_size == 0:
        sys.exit(f"FAIL: {path} is missing or empty")

metrics = json.loads((output_dir / "metrics.json").read_text())
if not {"val_accuracy", "val_loss"} <= set(metrics) or "test_accuracy" in metrics["history"][-1]:
    sys.exit("FAIL: metrics.json should hold validation numbers, and per-epoch rows no test numbers")
if metrics["test_accuracy"] < GATE:
    sys.exit(f"FAIL: test accuracy {metrics['test_accuracy']:.4f} is below the gate {GATE}")


def read_idx(name):
    """An IDX file: big-endian magic (last byte = number of dimensions), sizes, then uint8 data."""
    data = gzip.decompress((raw / f"{name}.gz").read_bytes())
    dimensions = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=dimensions, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


images = torch.from_numpy(read_idx("t10k-images-idx3-ubyte").astype(np.float32))  # (10000, 28, 28)
labels = torch.from_numpy(read_idx("t10k-labels-idx1-ubyte").astype(np.int64))    # (10000,)
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
