"""Mutation testing by hand: does `python -m pytest` catch the bugs that students make?

Each mutant below is one small, plausible bug in mnist.py's lesson or in its tool's code: a
line deleted, two arguments swapped, a number changed. For each, a copy of mnist.py with that one
change goes into a temporary folder beside a copy of test_mnist.py, and the suite runs there with
-x (it stops at the first failure). A mutant is *killed* when the suite fails, and *survives*
when it passes. Run by hand (about 10 minutes on 2 cores; CI does not run it):

    python .ci/mutants.py            # every mutant
    python .ci/mutants.py 3 17       # only mutants 3 and 17
    python .ci/mutants.py --random 40 --seed 1   # 40 mechanical mutants instead (see below)

The list was written together with the tests that kill it, so it flatters them. --random draws
mutants that nobody chose: in a line of Parts 1 and 2, or of the tool's section 16 (MNIST's
files, your images and the trained model), picked at
random, it flips a comparison, swaps an arithmetic operator, changes a number, swaps True and
False, or deletes the line if it is a whole statement. Some of those cannot be told apart from
the original (a changed default that every caller overrides, say); read each survivor.

It prints one line per mutant and the kill rate, and exits 1 if any mutant survives that is not
marked as equivalent (a change that no test can tell apart from the original, with the reason).
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what the bug is, the text to find (exactly once), its replacement, why it is harmless or None)
MUTANTS = [
    # The training step
    ("model.train() deleted", "    model.train()  # dropout on\n", "", None),
    ("optimizer.zero_grad() deleted", "        optimizer.zero_grad()", "        pass", None),
    ("step before backward", "        loss.backward()\n        optimizer.step()",
     "        optimizer.step()\n        loss.backward()", None),
    ("scheduler.step() deleted", "        scheduler.step()\n", "", None),
    ("the rate recorded after the scheduler's step",
     "        rates.append(scheduler.get_last_lr()[0])  # the rate this step used\n"
     "        scheduler.step()",
     "        scheduler.step()\n        rates.append(scheduler.get_last_lr()[0])", None),
    ("the schedule's hook never attached", "    optimizer.register_step_post_hook(next_rate)\n",
     "", None),
    ("the epoch's loss a sum of batch means", "loss_sum += loss.detach() * len(labels)",
     "loss_sum += loss.detach()", None),
    ("the epoch's accuracy counts batches", "        seen += len(labels)", "        seen += 1",
     None),
    ("the epoch's accuracy counts the wrong answers",
     "correct += (logits.argmax(dim=1) == labels).sum()",
     "correct += (logits.argmax(dim=1) != labels).sum()", None),
    ("model.eval() deleted from evaluate", "    model.eval()\n    # 1,000 digits",
     "    # 1,000 digits", None),
    ("torch.no_grad() deleted from evaluate", "@torch.no_grad()\ndef evaluate",
     "def evaluate", "only memory and time: no number changes"),
    # The network
    ("the first ReLU an identity", "            nn.ReLU(),\n            nn.Dropout(dropout),\n"
     "            nn.Linear(128, 64)", "            nn.Identity(),\n            nn.Dropout(dropout),\n"
     "            nn.Linear(128, 64)", None),
    ("the second ReLU an identity", "            nn.ReLU(),\n            nn.Dropout(dropout),\n"
     "            nn.Linear(64, 10)", "            nn.Identity(),\n            nn.Dropout(dropout),\n"
     "            nn.Linear(64, 10)", None),
    ("the first dropout ignores its setting", "            nn.Dropout(dropout),\n"
     "            nn.Linear(128, 64)", "            nn.Dropout(0.2),\n            nn.Linear(128, 64)",
     None),
    ("train_model ignores dropout", "    model = MLP(dropout).to(device)\n    print(",
     "    model = MLP().to(device)\n    print(", None),
    ("train_original ignores dropout", "    model = MLP(dropout).to(device)\n    optimizer",
     "    model = MLP().to(device)\n    optimizer", None),
    # The data
    ("validation digits also trained on", "to_train, to_validate = order[validation_size:], "
     "order[:validation_size]", "to_train, to_validate = order, order[:validation_size]", None),
    ("the statistics from every split", 'std, mean = torch.std_mean(pixels["train"])',
     "std, mean = torch.std_mean(torch.cat(list(pixels.values())))", None),
    ("the split follows --seed", "order = torch.randperm(len(images), generator=torch.Generator()"
     ".manual_seed(0))", "order = torch.randperm(len(images))", None),
    ("no shuffling", "order = torch.randperm(len(images), generator=generator).to(images.device)",
     "order = torch.arange(len(images)).to(images.device)", None),
    ("the same order every epoch", "order = torch.randperm(len(images), generator=generator)",
     "order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))", None),
    ("train_model's batch order ignores the seed", "    generator = torch.Generator().manual_seed("
     "seed)\n\n", "    generator = torch.Generator()\n\n", None),
    ("shifts pad with 0, not black", "value=background)", "value=0.0)", None),
    ("the recipe's background is white-ish", "max_shift, -mean / std, generator",
     "max_shift, mean / std, generator", None),
    ("no shift at all", "shifted[chosen] = padded[chosen, y:y + 28, x:x + 28]",
     "shifted[chosen] = padded[chosen, s:s + 28, s:s + 28]", None),
    ("the same shift for the whole batch", "(2, len(images)), generator=generator)",
     "(2, 1), generator=generator).expand(2, len(images))", None),
    ("shifts drawn from the global generator", "(2, len(images)), generator=generator)",
     "(2, len(images)))", None),
    ("never a shift of max_shift", "torch.randint(0, 2 * s + 1,", "torch.randint(0, 2 * s,", None),
    ("a shift of 1 taken as none", "    if s == 0:\n        return images",
     "    if s <= 1:\n        return images", None),
    ("a dry run trains on 30 batches", "[3 * batch_size, 1000, 1000]",
     "[30 * batch_size, 1000, 1000]", None),
    ("a dry run scores 10,000 validation digits", "[3 * batch_size, 1000, 1000]",
     "[3 * batch_size, 10000, 1000]", None),
    ("a dry run trains every epoch asked for", "epochs = pick_device(device), 1 if dry_run else epochs",
     "epochs = pick_device(device), epochs", None),
    ("--validation-size 0 keeps an empty validation split",
     '    if validation_size == 0:\n        del splits["validation"]\n', "", None),
    ("the seed ignored", "    torch.manual_seed(seed)\n", "    torch.manual_seed(0)\n", None),
    # The schedule
    ("the warm-up takes half the run", "pct_start=0.15", "pct_start=0.5", None),
    ("the peak a tenth of --lr", "max_lr=lr,", "max_lr=lr / 10,", None),
    ("the constant schedule halves the rate", "ConstantLR(optimizer, factor=1.0)",
     "ConstantLR(optimizer, factor=0.5)", None),
    ("the trace after the schedule's hook: its copy steps the real schedule",
     "    trace_one_digit(model, optimizer, train_images[0], train_labels[0])\n"
     "    total_steps = epochs * math.ceil(len(train_images) / batch_size)  # 2,150 by default\n"
     "    rates = schedule_rates(optimizer, lr_schedule, lr, total_steps)",
     "    total_steps = epochs * math.ceil(len(train_images) / batch_size)  # 2,150 by default\n"
     "    rates = schedule_rates(optimizer, lr_schedule, lr, total_steps)\n"
     "    trace_one_digit(model, optimizer, train_images[0], train_labels[0])", None),
    ("the trace steps the real optimizer", "model, optimizer = copy.deepcopy((model, optimizer))",
     "model = copy.deepcopy(model)", None),
    # The numbers reported
    ("the loss summed, not averaged", '"loss": F.cross_entropy(logits, labels).item()',
     '"loss": F.cross_entropy(logits, labels, reduction="sum").item()', None),
    ("accuracy over one digit too many", '"accuracy": (predictions == labels).sum().item() / '
     'len(labels)', '"accuracy": (predictions == labels).sum().item() / (len(labels) + 1)', None),
    ("confidences are logits", "confidences, predictions = logits.softmax(dim=1).max(dim=1)",
     "confidences, predictions = logits.max(dim=1)", None),
    ("validation loss and accuracy swapped",
     'row.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])',
     'row.update(val_loss=scores["accuracy"], val_accuracy=scores["loss"])', None),
    ("the train row reports the accuracy as the loss",
     '"train_loss": train_loss, "train_accuracy": train_accuracy}',
     '"train_loss": train_accuracy, "train_accuracy": train_accuracy}', None),
    ("the confusion matrix transposed", "confusion_matrix(truth, predictions, labels=range(10))",
     "confusion_matrix(predictions, truth, labels=range(10))", None),
    ("precision and recall swapped",
     "report = classification_report(truth, predictions, output_dict=True",
     "report = classification_report(predictions, truth, output_dict=True", None),
    ("the least confident mistakes first", "argsort(descending=True)][:25]", "argsort()][:25]",
     None),
    ("only 10 mistakes kept", "argsort(descending=True)][:25]", "argsort(descending=True)][:10]",
     None),
    ("the mistakes' confidence is another digit's",
     '"confidence": confidences[i].item()', '"confidence": confidences[0].item()', None),
    ("the trace picks the largest signed gradient", "unit = gradients.abs().amax(dim=1)",
     "unit = gradients.amax(dim=1)", None),
    ("mean and std swapped in metrics", '"normalization": {"mean": mean, "std": std}',
     '"normalization": {"mean": std, "std": mean}', None),
    ("divergence caught only at 100 guesses", "train_loss < 10 * math.log(10)",
     "train_loss < 100 * math.log(10)", None),
    # Your own digits
    ("never inverted", "    if np.median(border) > 0.5:", "    if np.median(border) > 1.5:",
     None),
    ("the ink box centred, not the mass", "top = round(14 - (box.sum(axis=1) * np.arange(height))"
     ".sum() / box.sum())", "top = round(14 - height / 2)", None),
    ("the ink scaled to 22 pixels", "scale = 20 / max(box.shape)", "scale = 22 / max(box.shape)",
     None),
    ("paper laid under transparency is black",
     'Image.alpha_composite(Image.new("RGBA", image.size, "white")',
     'Image.alpha_composite(Image.new("RGBA", image.size, "black")', None),
    ("16-bit grey read as 8-bit", "(np.asarray(image) / 257)", "np.asarray(image)", None),
    ("the background not subtracted", "ink = np.clip(grey - np.median(border), 0, None)",
     "ink = np.clip(grey, 0, None)", None),
    ("predict does not normalize", "return model.eval()((digits - mean) / std).softmax(dim=1)",
     "return model.eval()(digits).softmax(dim=1)", None),
    ("predict's softmax across digits", "return model.eval()((digits - mean) / std).softmax(dim=1)",
     "return model.eval()((digits - mean) / std).softmax(dim=0)", None),
    ("predict with dropout on", "return model.eval()((digits - mean) / std)",
     "return model.train()((digits - mean) / std)", None),
    ("a speck counts as part of the digit", "amounts >= amounts.max() / 10", "amounts >= 0", None),
    ("a separate stroke dropped", "amounts >= amounts.max() / 10", "amounts >= amounts.max()",
     None),
    ("EXIF rotation ignored", "image = ImageOps.exif_transpose(image)", "image = image.copy()",
     None),
    ("upper-case suffixes skipped", "file.suffix.lower() in readable", "file.suffix in readable",
     None),
    ("hidden files read", 'and not file.name.startswith(".")\n', "\n", None),
    ("mean and std swapped on loading", 'return model, (float(saved["mean"]), float(saved["std"]))',
     'return model, (float(saved["std"]), float(saved["mean"]))', None),
    ("model.pt saved with the device's tensors", "{key: value.cpu() for key, value in",
     "{key: value for key, value in", None),
    ("the digit and its confidence swapped", "confidences, predicted = predict(",
     "predicted, confidences = predict(", None),
    ("--device ignored by --predict", "predict(model.to(device), digits",
     "predict(model.to(\"cpu\"), digits", None),
    # main() hands each flag to the recipe, with train_model's defaults
    ("main passes no flag on", "model, metrics = train_model(**{**recipe, \"device\": device})",
     "model, metrics = train_model(device=device)", None),
    ("a flag's default hard-coded", 'default=default[flag[2:].replace("-", "_")]',
     'default=default[flag[2:].replace("-", "_")] if flag != "--epochs" else 10', None),
    ("a dry run scores every test digit", "[3 * batch_size, 1000, 1000]",
     "[3 * batch_size, 1000, 10**9]", None),
    ("the device probed again in train_model", "device, epochs = pick_device(device), 1 if",
     "device, epochs = device_or_error(device), 1 if", None),
    # The tool
    ("bad input exits 1", "raise SystemExit(error.args[1] if len(error.args) > 1 else 2)",
     "raise SystemExit(error.args[1] if len(error.args) > 1 else 1)", None),
    ("Ctrl-C exits 1", "raise SystemExit(130) from None", "raise SystemExit(1) from None", None),
    ("a report written in place", "content.savefig(temporary, format=\"png\", dpi=100)",
     "content.savefig(path, format=\"png\", dpi=100)", None),
    ("metrics.json written in place", 'temporary.write_text(json.dumps(content, indent=2) + "\\n")',
     'path.write_text(json.dumps(content, indent=2) + "\\n")', None),
]


SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "+": "-", "-": "+",
         "*": "/", "/": "*", "True": "False", "False": "True", "and": "or", "or": "and"}


def random_mutants(count, seed):
    """Mechanical mutants of the lesson's code and section 16's (never of comments or strings):
    (name, old line, new line, None), each old line unique in the file."""
    import ast
    import io
    import random
    import tokenize
    source = (ROOT / "mnist.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    part_3 = source[:source.index("\n# Part 3.")].count("\n") + 2
    section_16 = (source[:source.index("# %% 16.")].count("\n") + 1,
                  source[:source.index("# %% 17.")].count("\n") + 1)
    wanted = set(range(1, part_3)) | set(range(*section_16))
    candidates = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        row, column = token.start
        if row not in wanted or token.start[0] != token.end[0]:
            continue
        line = lines[row - 1]
        if token.string in SWAPS and token.type in (tokenize.OP, tokenize.NAME):
            new = SWAPS[token.string]
        elif token.type == tokenize.NUMBER and "j" not in token.string:
            new = str(int(token.string) + 1) if token.string.isdigit() else f"({token.string} * 2)"
        else:
            continue
        candidates.append((f"{token.string} -> {new}", line,
                           line[:column] + new + line[token.end[1]:]))
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) and node.lineno in wanted
                and node.lineno == node.end_lineno
                and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))):
            line = lines[node.lineno - 1]
            candidates.append(("line deleted", line, line[:node.col_offset] + "pass"))
    candidates = [mutant for mutant in candidates if source.count(mutant[1]) == 1]
    chosen = random.Random(seed).sample(candidates, min(count, len(candidates)))
    return [(f"{name} in: {old.strip()[:60]}", old, new, None) for name, old, new in chosen]


def run(number, name, old, new, files):
    source = (ROOT / "mnist.py").read_text(encoding="utf-8")
    if source.count(old) != 1:
        return "stale", f"the text to change occurs {source.count(old)} times"
    with tempfile.TemporaryDirectory() as folder:
        for file in files:
            shutil.copy(ROOT / file, folder)
        Path(folder, "mnist.py").write_text(source.replace(old, new), encoding="utf-8")
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                                     "no:cacheprovider", "test_mnist.py"], cwd=folder,
                                    capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "killed", "timed out"
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    return ("killed" if result.returncode else "survived"), (failed[0][7:90] if failed else "")


def main(arguments):
    mutants, chosen = MUTANTS, set()
    if arguments[:1] == ["--random"]:
        seed = int(arguments[arguments.index("--seed") + 1]) if "--seed" in arguments else 0
        mutants = random_mutants(int(arguments[1]), seed)
    else:
        chosen = {int(argument) for argument in arguments}
    results = []
    for number, (name, old, new, harmless) in enumerate(mutants, 1):
        if chosen and number not in chosen:
            continue
        started = time.perf_counter()
        outcome, detail = run(number, name, old, new, ["test_mnist.py"])
        if outcome == "survived" and harmless:
            outcome = "equivalent"
            detail = harmless
        results.append((number, name, outcome))
        print(f"{number:3} {outcome:10} {time.perf_counter() - started:5.1f} s  {name}: {detail}",
              flush=True)
    meaningful = [r for r in results if r[2] in ("killed", "survived")]
    killed = sum(r[2] == "killed" for r in meaningful)
    print(f"\n{killed} of {len(meaningful)} meaningful mutants killed "
          f"({killed / max(1, len(meaningful)):.0%}); "
          f"{sum(r[2] == 'equivalent' for r in results)} equivalent, "
          f"{sum(r[2] == 'stale' for r in results)} stale")
    return 0 if killed == len(meaningful) and not any(r[2] == "stale" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
