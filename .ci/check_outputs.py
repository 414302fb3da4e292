"""CI's end-to-end gate, run after `python mnist.py --epochs 10` on the real MNIST.

1. Every report file exists and is not empty.
2. The test accuracy in metrics.json is at least 0.975. This only catches breakage: a healthy
   run of the default recipe scores about 0.985.
3. model.pt, loaded into a fresh MLP, reproduces exactly the test accuracy and the confusion
   matrix that metrics.json reports, on test digits read here straight from the IDX file
   (not through mnist.py's or torchvision's loading code).

Usage: python .ci/check_outputs.py [OUTPUT_DIR] [DATA_DIR]
"""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnist import MLP  # noqa: E402

output_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs")
raw = Path(sys.argv[2] if len(sys.argv) > 2 else "data") / "MNIST" / "raw"
GATE = 0.975

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
mean, std = metrics["normalization"]["mean"], metrics["normalization"]["std"]

model = MLP()
model.load_state_dict(torch.load(output_dir / "model.pt", weights_only=True))
model.eval()
with torch.no_grad():
    predictions = model((images / 255 - mean) / std).argmax(dim=1)

accuracy = (predictions == labels).sum().item() / len(labels)
matrix = torch.zeros(10, 10, dtype=torch.long)
matrix.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
if accuracy != metrics["test_accuracy"]:
    sys.exit(f"FAIL: reloaded model scores {accuracy}; metrics.json says "
             f"{metrics['test_accuracy']}")
if matrix.tolist() != metrics["confusion_matrix"]:
    sys.exit("FAIL: reloaded model's confusion matrix differs from metrics.json")
print(f"OK: all reports written; test accuracy {accuracy:.4f} (gate {GATE}); model.pt reproduces "
      "the accuracy and the confusion matrix in metrics.json")
