"""Make docs/mnist.ipynb, the lesson as a notebook with its outputs, from mnist.py's Parts 1 and 2.

    pip install -r requirements.txt -r docs/notebook-requirements.txt
    python docs/make_notebook.py           # rebuild it from mnist.py, run it, write it (a minute)
    python docs/make_notebook.py --check   # fail if its text or code is not what mnist.py makes
    python docs/make_notebook.py --run [--log RUN_LOG]   # run it as committed, alone, and check

jupytext reads the "# %%" cells of Parts 1 and 2. Each section's comments become a text cell and
its code a code cell, as they stand in mnist.py; the headings of Part 1's sections say "core". The
notebook adds only what is in this file: a first text cell (INTRO), and under some sections a
cell that shows it at work (AT_WORK). Two of those are made from train_model's signature, so that
they follow it: Part 2's settings, each of train_model's parameters with its default, and the
last cell, which runs train_model with them. The recipe itself runs only in mnist.py's code.

--run runs the committed notebook in a fresh kernel, in an empty folder that holds only itself
and MNIST's four files (data/MNIST/raw/ beside this repository's root, or ../shared/data, else it
downloads them), and checks it: no cell fails; the original recipe scores at least 97.5 % on the
test set and train_model at least --gate; the committed outputs hold no error, and each test
accuracy in them is the fresh run's within half a point; and, with --log (what `python mnist.py`
printed on the same machine), train_model's epochs print the same numbers as that run's.
"""

import argparse
import ast
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jupytext
import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "mnist.ipynb"

INTRO = """\
# Teach a small neural network to read handwritten digits (MNIST)

**Run all** (in Colab: Runtime → Run all). It downloads MNIST (11 MB), then trains two networks
and tests each once: under a minute on a 2-core CPU (half a minute here), less on a GPU. For a
GPU in Colab, first choose Runtime → Change runtime type → a GPU; the code uses it by itself.

**Part 1 is the core**, the original recipe, whole: the cells headed *core* load the data, build
the network, train it and test it. Copied alone into an empty notebook, in order, they run: they
are what a first model of your own needs. **Part 2** improves the recipe one measured step at a
time, and ends in `train_model`, the recipe that the repository's `python mnist.py` runs. The
cells that begin *At work* are this notebook's own: they show each section on MNIST.

The exercises in the repository's README work here too: a flag is the setting of the same name in
the settings cell at the start of Part 2, such as `dropout = 0` for `--dropout 0`, and a change of
code is made in the cell that holds that code; then run that cell and every cell below it again.
On Kaggle with the internet off, attach the four MNIST files, unpacked, in a folder `MNIST/raw/`,
and pass its parent folder as `data_dir` (torchvision reads unpacked files where they are).
"""

AT_WORK = {  # what each section runs, by its number
    "8": """\
# At work: the original recipe, trained and tested once.
original_model, original_metrics = train_original()
plot_confusion_matrix(original_metrics["confusion_matrix"]);
""",
    "9": """\
# At work: the data that train_model will see, and an untrained network's loss.
torch.manual_seed(seed)
splits, (mean, std) = load_mnist(data_dir, validation_size, pick_device(device))
describe_data(splits, mean, std)
train_images, train_labels = splits["train"]
plot_grid(train_images[:20].cpu(), train_labels[:20].tolist(),
          "The first 20 training digits, standardized, and their labels", columns=10)
untrained = MLP(dropout).to(pick_device(device))
loss_before_training(untrained, train_images[:1000], train_labels[:1000]);
""",
    "10": """\
# At work: one digit's step, and what plain SGD would do at the same rate.
optimizer = torch.optim.Adam(untrained.parameters(), lr=lr)
_, (before, gradient, after) = trace_one_digit(untrained, optimizer, train_images[0],
                                               train_labels[0])
print(f"  plain SGD, at the same rate, would move it by {-lr * gradient:+.6f}")
""",
    "11": """\
# At work: the rate at every step of a run, from the schedule on a stand-in optimizer.
stand_in = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
total_steps = epochs * math.ceil(len(train_images) / batch_size)
rates = schedule_rates(stand_in, lr_schedule, lr, total_steps)
for step in range(total_steps):
    stand_in.step()  # with no gradient, a step changes nothing but the next rate
figure, axes = plt.subplots(figsize=(7, 2.5), layout="constrained")
axes.plot(range(1, total_steps + 1), rates)
axes.set(xlabel="step", ylabel="learning rate", title=f"The {lr_schedule} schedule");
""",
    "12": """\
# At work: the first training digit as stored, and shifted at random eight times, each titled
# by how far it moved.
digit = train_images[0]
shifted = shift_randomly(digit.repeat(8, 1, 1), max_shift, -mean / std,
                         torch.Generator().manual_seed(seed))
moves = [next((f"{down:+d} down, {right:+d} right" for down in range(-max_shift, max_shift + 1)
               for right in range(-max_shift, max_shift + 1)
               if torch.allclose(digit.roll((down, right), (0, 1)), moved)), "") for moved in shifted]
plot_grid(torch.stack([digit, *shifted]).cpu(), ["as stored", *moves],
          f"The first training digit, shifted at random (max_shift = {max_shift})", columns=9);
""",
    "13": """\
# At work: a 7 as a photo of paper shows it, dark and off-centre, with a speck of dust in a
# corner, and what the original recipe's network reads when the photo is resized straight to
# 28 x 28, and when it is prepared.
from PIL import ImageDraw
photo = Image.new("RGB", (300, 220), (225, 220, 210))
ImageDraw.Draw(photo).line([(40, 30), (130, 30), (75, 180)], fill=(30, 30, 40), width=14)
ImageDraw.Draw(photo).rectangle([280, 200, 285, 205], fill=(30, 30, 40))  # the speck
titles, resized, prepared = ["the photo"], photo.resize((28, 28)), prepare_digit(photo)
for name, digit in (("resized", torch.tensor(np.asarray(resized.convert("L")) / 255)),
                    ("prepared", prepared)):
    probabilities = predict(original_model, digit[None].float(), mean, std)[0]
    titles.append(f"{name}: {probabilities.argmax()} ({probabilities.max():.0%})")
plot_grid([photo, resized, prepared], titles, "What the network reads", columns=3);
""",
}


def markdown(comments):
    """Comment lines as Markdown: "# " goes, and lines indented further become a code block."""
    lines, block = [], []
    for line in comments + [""]:
        text = line[2:] if line.startswith("# ") else line.lstrip("#")
        if text.startswith("  "):  # a printed sample, or example code
            block.append(text)
            continue
        if block:
            indent = min(len(sample) - len(sample.lstrip()) for sample in block)
            lines += ["", "```", *[sample[indent:] for sample in block], "```", ""]
            block = []
        lines.append(text)
    return "\n".join(lines).strip() + "\n"


def split_cell(source):
    """A section's cell, as (kind, text) pieces: each block of comments that starts a cell or
    follows a blank line at the top level becomes text, the code between them code."""
    pieces, lines = [], source.splitlines()
    start = 0
    for index, line in enumerate(lines + [""]):
        starts_prose = line.startswith("# ") and (index == 0 or not lines[index - 1].strip())
        if starts_prose or index == len(lines):
            code = "\n".join(lines[start:index]).strip("\n")
            if code:
                pieces.append(("code", code))
            if index == len(lines):
                break
            end = index
            while end < len(lines) and lines[end].startswith("#"):
                end += 1
            pieces.append(("markdown", markdown(lines[index:end])))
            start = end
    return pieces


def from_signature(source):
    """Part 2's settings cell and the last cell, from train_model's signature in source."""
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "train_model")
    names = [argument.arg for argument in function.args.args]
    defaults = [ast.get_source_segment(source, default) for default in function.args.defaults]
    settings = "\n".join(f"{name} = {default}" for name, default in zip(names, defaults))
    run = ",\n    ".join(f"{name}={name}" for name in names)
    return (f"# The settings of Part 2: train_model's parameters, with its defaults. Change one,"
            f"\n# then run this cell and the cells below it again.\n{settings}",
            f"# At work: the recipe with the settings above, trained and tested once.\n"
            f"model, metrics = train_model(\n    {run})\n"
            "plot_training_curves(metrics[\"history\"], metrics[\"learning_rates\"])\n"
            "plot_confusion_matrix(metrics[\"confusion_matrix\"])\n"
            "mistakes = metrics[\"mistakes\"]\n"
            "plot_grid(splits[\"test\"][0][[m[\"index\"] for m in mistakes]].cpu(),\n"
            "          [f\"{m['label']} → {m['predicted']} ({m['confidence']:.0%})\" for m in "
            "mistakes],\n"
            "          \"The test digits it got most confidently wrong: true → predicted "
            "(confidence)\",\n          columns=5);")


def build():
    """The notebook that mnist.py makes, without outputs."""
    source = (ROOT / "mnist.py").read_text(encoding="utf-8")
    core, rest = source.split("\n# Part 2.", 1)
    banner, part_2 = rest[:rest.index("\n# Part 3.")].split("\n# %%", 1)  # Part 2's own text
    part_2_title, *part_2_text = ("Part 2." + banner).splitlines()
    settings, last = from_signature(source)
    notebook = nbformat.v4.new_notebook()
    cells = notebook.cells
    cells.append(nbformat.v4.new_markdown_cell(INTRO))
    cells.append(nbformat.v4.new_markdown_cell("# Part 1. The core: the original recipe, whole"))
    for part, text in (("1", core), ("2", "# %%" + part_2)):
        if part == "2":
            cells.append(nbformat.v4.new_markdown_cell(
                f"# {part_2_title.rstrip(' =')}\n\n{markdown(part_2_text)}".rstrip("\n")))
            cells.append(nbformat.v4.new_code_cell(settings))
        sections = jupytext.reads(text, fmt="py:percent").cells
        for section in sections:
            title = section.metadata.get("title")
            if not title:  # the module's docstring
                continue
            pieces = split_cell(section.source)
            heading = f"## {title}" + (" · *core*" if part == "1" else "")
            if pieces and pieces[0][0] == "markdown":
                pieces[0] = ("markdown", f"{heading}\n\n{pieces[0][1]}")
            else:
                pieces.insert(0, ("markdown", heading + "\n"))
            for kind, piece in pieces:
                new = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
                cells.append(new(piece.rstrip("\n")))
            number = title.split(".")[0]
            if number in AT_WORK:
                cells.append(nbformat.v4.new_code_cell(AT_WORK[number].rstrip("\n")))
    cells.append(nbformat.v4.new_code_cell(last))
    notebook.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for number, cell in enumerate(cells):
        cell.id = f"cell-{number}"  # stable ids, so that a rebuild changes only what changed
    return notebook


def execute(notebook):
    """Run the notebook in a fresh kernel, in an empty folder with MNIST's files."""
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "data" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for source in (ROOT / "data", ROOT.parent / "shared" / "data"):
            source = source / "MNIST" / "raw"
            if len(list(source.glob("*.gz"))) == 4:
                for file in source.glob("*.gz"):
                    shutil.copyfile(file, raw / file.name)
                break
        client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                         record_timing=False,
                                         resources={"metadata": {"path": folder}})
        client.execute()
    for cell in (cell for cell in notebook.cells if cell.cell_type == "code"):
        joined = []  # each print is an output of its own: join those that follow each other
        for output in cell.outputs:
            if (joined and output.output_type == joined[-1].output_type == "stream"
                    and output.name == joined[-1].name):
                joined[-1].text += output.text
            else:
                joined.append(output)
        cell.outputs = joined
    return notebook


def printed(notebook, start):
    """What the code cell whose source starts with start printed."""
    cell = next(cell for cell in notebook.cells if cell.source.startswith(start))
    return "".join(output.get("text", "") for output in cell.get("outputs", []))


def accuracies(notebook):
    """The test accuracy that each recipe's cell printed, or None: (original, train_model)."""
    found = [re.search(r"test accuracy (\d+\.\d+)%", printed(notebook, start))
             for start in ("# At work: the original recipe", "# At work: the recipe")]
    return [float(match.group(1)) if match else None for match in found]


def errors(notebook):
    return [output for cell in notebook.cells for output in cell.get("outputs", [])
            if output.output_type == "error"]


def epochs(text):
    """The epoch lines in text, without their seconds."""
    return [re.sub(r"\s+\d+\.\d+ s$", "", line) for line in text.splitlines()
            if line.startswith("epoch ")]


def check_run(committed, fresh, gate, log):
    """What is wrong with a fresh run of the committed notebook, and with its committed outputs."""
    problems = [f"{len(errors(fresh))} cells failed"] if errors(fresh) else []
    if errors(committed):
        problems.append(f"the committed outputs hold {len(errors(committed))} errors")
    pictures = sum("image/png" in output.get("data", {}) for cell in fresh.cells
                   for output in cell.get("outputs", []))
    at_work = sum(1 for cell in fresh.cells if cell.cell_type == "code" and cell.outputs
                  and cell.source.startswith("# At work"))
    if at_work < 7 or pictures < 7:
        problems.append(f"output under {at_work} sections, with {pictures} pictures")
    (original, final), committed_accuracies = accuracies(fresh), accuracies(committed)
    if not original or original < 97.5 or not final or final < 100 * gate:
        problems.append(f"test accuracy {original}% for the original recipe (at least 97.5% "
                        f"wanted) and {final}% for train_model (at least {100 * gate:g}%)")
    for name, new, old in zip(("the original recipe", "train_model"), (original, final),
                              committed_accuracies):
        if new and (old is None or abs(new - old) > 0.5):
            problems.append(f"the committed notebook shows {old}% as {name}'s test "
                            f"accuracy, where a fresh run scores {new}%")
    if log is not None:
        wanted, got = epochs(log.read_text(encoding="utf-8")), epochs(printed(fresh, "# At work: "
                                                                              "the recipe"))
        if wanted != got:
            diff = difflib.unified_diff(wanted, got, str(log), "the notebook", lineterm="", n=0)
            problems.append("train_model's epochs in the notebook are not those of the run in "
                            f"{log}:\n" + "\n".join(diff))
    print(f"ran the notebook: output under {at_work} sections, {pictures} pictures, test "
          f"accuracy {original}% (original recipe) and {final}% (train_model); committed: "
          f"{committed_accuracies[0]}% and {committed_accuracies[1]}%")
    return problems


def check():
    """The cells of docs/mnist.ipynb that differ from what mnist.py makes now."""
    wanted = build().cells
    have = nbformat.read(NOTEBOOK, as_version=4).cells
    problems = []
    for number, (new, old) in enumerate(zip(wanted, have)):
        if (new.cell_type, new.source) != (old.cell_type, old.source):
            diff = difflib.unified_diff(old.source.splitlines(), new.source.splitlines(),
                                        "docs/mnist.ipynb", "mnist.py makes", lineterm="", n=1)
            problems.append(f"cell {number} differs:\n" + "\n".join(diff))
    if len(wanted) != len(have):
        problems.append(f"{len(have)} cells, where mnist.py makes {len(wanted)}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="compare, run nothing")
    action.add_argument("--run", action="store_true", help="run docs/mnist.ipynb as committed")
    parser.add_argument("--gate", type=float, default=0.98, help="train_model's least accuracy")
    parser.add_argument("--log", type=Path, help="what `python mnist.py` printed here")
    args = parser.parse_args()
    if args.check:
        problems = check()
        if problems:
            print("docs/mnist.ipynb is stale: run python docs/make_notebook.py\n" +
                  "\n".join(problems[:3]), file=sys.stderr)
            return 1
        print("docs/mnist.ipynb holds what mnist.py makes")
        return 0
    committed = nbformat.read(NOTEBOOK, as_version=4) if args.run else None
    notebook = execute(nbformat.read(NOTEBOOK, as_version=4) if args.run else build())
    problems = check_run(committed or notebook, notebook, args.gate, args.log)
    if problems:
        print("the notebook failed: " + "\n".join(problems), file=sys.stderr)
        return 1
    if not args.run:
        notebook.metadata.pop("widgets", None)
        nbformat.write(notebook, NOTEBOOK)
        print(f"wrote {NOTEBOOK.relative_to(ROOT)}, {NOTEBOOK.stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
