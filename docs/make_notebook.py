"""Make docs/mnist.ipynb, the lesson as a notebook with its outputs, from mnist.py's Part 1.

    pip install -r docs/notebook-requirements.txt   # jupytext, nbclient and ipykernel
    python docs/make_notebook.py           # rebuild it from mnist.py, run it, write it (a minute)
    python docs/make_notebook.py --check   # fail if its text or code is not what mnist.py makes
    python docs/make_notebook.py --run     # run it as it is, alone in an empty folder, and check

jupytext reads Part 1's "# %%" cells. Each section's comments become a text cell and its code a
code cell, as they stand in mnist.py. The notebook adds only what is in this file: a first text
cell (INTRO), a cell of settings, the three figure functions of mnist.py's Part 2 in a folded
cell, and under the sections whose code does something, a cell that shows it at work (AT_WORK).
The notebook runs in a fresh kernel, in an empty folder that holds only itself and MNIST's four
files (the folder data/MNIST/raw/ beside this repository's root, or ../shared/data, else it
downloads them). It must end without an error, at a test accuracy of at least --gate, with output
under at least 6 sections and at least 5 pictures.
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

This is the lesson of `mnist.py`, Part 1, with every output and picture under the code that makes
it. It is made from `mnist.py` by `docs/make_notebook.py`, so the two say the same: read either.
The cells that begin *at work* are the notebook's own: they run each section's code on MNIST. So
are the settings cell and the folded cell of figures under section 1; every other cell is Part 1:
copy those to use the lesson's code in a notebook of your own. The README and docs/RESULTS.md,
which the text names, are beside this notebook in its repository.

**Run all** downloads MNIST (11 MB), trains in well under a minute on a CPU, in seconds on a GPU,
and shows every output again. It needs no other file. On Kaggle with the internet off, attach a
dataset that holds the four MNIST files, unpacked, in a folder `MNIST/raw/`, and set `data_dir`
below to the folder above `MNIST/`: torchvision reads unpacked files where they are, without
writing (`.gz` files it must unpack into a folder it can write to, such as `data/MNIST/raw/`).

The README's exercises work here too. A flag is the setting of the same name in the settings
cell: `--dropout 0` is `dropout = 0`, and `--lr-schedule` is `schedule`. A change of code is made
in the cell that holds that code. Then run that cell and every cell below it again.
"""

SETTINGS = """\
# The settings: train_model's defaults (section 12), each explained where it is used. Change one,
# then run this cell and the cells below it again.
epochs, batch_size, lr, schedule = 10, 256, 3e-3, "one-cycle"
max_shift, dropout, validation_size, seed = 1, 0.2, 5000, 0
data_dir = "data"  # where MNIST/raw/ is, or goes
device = pick_device()  # section 1: a GPU that works, else the CPU
print(f"device: {device}")
"""

FIGURES = ("plot_grid", "plot_training_curves")  # mnist.py's Part 2, section A

AT_WORK = {  # what each section runs, by its number
    "2": """\
# At work: the splits, and the first training digits. The seed comes first, as in train_model.
torch.manual_seed(seed)
splits, (mean, std) = load_mnist(data_dir, validation_size, device)
describe_data(splits, mean, std)
train_images, train_labels = splits["train"]
plot_grid(train_images[:20].cpu(), train_labels[:20].tolist(),
          "The first 20 training digits, standardized, and their labels", columns=10);
""",
    "3": """\
# At work: the network, on the device, and its number of parameters.
model = MLP(dropout).to(device)
print(model)
print(f"parameters: {sum(weights.numel() for weights in model.parameters()):,}")
""",
    "4": """\
# At work.
loss = loss_before_training(model, train_images[:1000], train_labels[:1000])
""",
    "5": """\
# At work: the run's optimizer and schedule, and one digit's first step.
optimizer = torch.optim.Adam(model.parameters(), lr=lr)
total_steps = epochs * math.ceil(len(train_images) / batch_size)
scheduler = make_scheduler(optimizer, schedule, lr, total_steps)
_, (before, gradient, after) = trace_one_digit(model, optimizer, train_images[0], train_labels[0])
first_rate = scheduler.get_last_lr()[0]
print(f"  plain SGD, at the same rate, would move it by {-first_rate * gradient:+.6f}")
# The rate at every step of the run, from the same schedule on a stand-in optimizer:
stand_in = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
replay, rates = make_scheduler(stand_in, schedule, lr, total_steps), []
for step in range(total_steps):
    rates.append(replay.get_last_lr()[0])
    stand_in.step()  # with no gradient, a step changes nothing
    replay.step()
figure, axes = plt.subplots(figsize=(7, 2.5), layout="constrained")
axes.plot(range(1, total_steps + 1), rates)
axes.set(xlabel="step", ylabel="learning rate", title=f"The {schedule} schedule");
""",
    "6": """\
# At work: the first batch, and the first training digit as stored and shifted at random eight
# times, each titled by how far it moved.
batches = shuffled_batches(train_images, train_labels, batch_size, max_shift, -mean / std,
                           torch.Generator().manual_seed(seed))
batch, batch_labels = next(batches)
print(f"the first batch: images {tuple(batch.shape)}, labels {tuple(batch_labels.shape)}")
digit = train_images[0]
shifted = shift_randomly(digit.repeat(8, 1, 1), max_shift, -mean / std,
                         torch.Generator().manual_seed(seed))
moves = [next((f"{down:+d} down, {right:+d} right" for down in range(-max_shift, max_shift + 1)
               for right in range(-max_shift, max_shift + 1)
               if torch.allclose(digit.roll((down, right), (0, 1)), copy)), "") for copy in shifted]
plot_grid(torch.stack([digit, *shifted]).cpu(), ["as stored", *moves],
          f"The first training digit, shifted at random (max_shift = {max_shift})", columns=9);
""",
    "9": """\
# At work: training, on the batches of section 6 with the optimizer and schedule of section 5.
epoch_batches = functools.partial(shuffled_batches, train_images, train_labels, batch_size,
                                  max_shift, -mean / std, torch.Generator().manual_seed(seed))
history, rates = train_and_validate(model, optimizer, scheduler, epoch_batches, epochs,
                                    splits.get("validation"))
plot_training_curves(history, rates);
""",
    "10": """\
# At work: the test set's report, the confusion matrix, and the mistakes.
scores = final_scores(model, splits)
plot_confusion_matrix(scores["confusion_matrix"])
mistakes = scores["mistakes"]
plot_grid(splits["test"][0][[mistake["index"] for mistake in mistakes]].cpu(),
          [f"{m['label']} → {m['predicted']} ({m['confidence']:.0%})" for m in mistakes],
          "Test digits the model got most confidently wrong: true → predicted (confidence)",
          columns=5);
""",
    "11": """\
# At work: a 7 as a photo of paper shows it, dark and off-centre, and what the network reads in
# it when the photo is resized straight to 28 x 28, and when it is prepared.
from PIL import ImageDraw
photo = Image.new("RGB", (300, 220), (225, 220, 210))
ImageDraw.Draw(photo).line([(40, 30), (130, 30), (75, 180)], fill=(30, 30, 40), width=14)
resized = photo.resize((28, 28))
prepared = prepare_digit(photo)
titles = ["the photo"]
for name, digit in (("resized", torch.tensor(np.asarray(resized.convert("L")) / 255)),
                    ("prepared", prepared)):
    probabilities = predict(model, digit[None].float(), mean, std)[0]
    titles.append(f"{name}: {probabilities.argmax()} ({probabilities.max():.0%})")
plot_grid([photo, resized, prepared], titles, "What the network reads", columns=3);
""",
    "12": """\
# At work: the recipe in one call, as section 12 shows it, for one epoch. Its scores are those of
# this new one-epoch model, whose schedule rises and falls within that epoch; the model above
# stays as it is.
recipe_model, recipe_metrics = train_model(epochs=1, data_dir=data_dir)
digit = predict(recipe_model, prepared[None], **recipe_metrics["normalization"]).argmax().item()
print(f"the one-epoch model reads the prepared photo as {digit}")
""",
}


def markdown(comments, title=None):
    """Comment lines as Markdown: "# " goes, and lines indented further become a code block."""
    lines, block = [f"## {title}", ""] if title else [], []
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


def split_cell(source, title):
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
    if title:
        if pieces and pieces[0][0] == "markdown":
            pieces[0] = ("markdown", f"## {title}\n\n{pieces[0][1]}")
        else:
            pieces.insert(0, ("markdown", f"## {title}\n"))
    return pieces


def figure_functions(source):
    """mnist.py's source of the FIGURES functions, in the order named."""
    nodes = {node.name: node for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef)}
    return "\n\n\n".join(ast.get_source_segment(source, nodes[name]) for name in FIGURES)


def build():
    """The notebook that mnist.py makes, without outputs."""
    source = (ROOT / "mnist.py").read_text(encoding="utf-8")
    part_1 = source[:source.index("\n# Part 2.")].rsplit("\n", 1)[0]  # up to the banner
    sections = jupytext.reads(part_1, fmt="py:percent").cells[1:]  # [0] is the docstring
    notebook = nbformat.v4.new_notebook()
    notebook.cells.append(nbformat.v4.new_markdown_cell(INTRO))
    for section in sections:
        title = section.metadata["title"]
        for kind, text in split_cell(section.source, title):
            new = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
            notebook.cells.append(new(text.rstrip("\n")))
        number = title.split(".")[0]
        if number == "1":
            notebook.cells.append(nbformat.v4.new_code_cell(SETTINGS.rstrip("\n")))
            figures = nbformat.v4.new_code_cell(
                "#@title Figures: drawing functions from mnist.py's Part 2 (no need to read them)\n"
                + figure_functions(source))
            figures.metadata.update({"cellView": "form", "jupyter": {"source_hidden": True}})
            notebook.cells.append(figures)
        if number in AT_WORK:
            notebook.cells.append(nbformat.v4.new_code_cell(AT_WORK[number].rstrip("\n")))
    notebook.metadata.update({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for number, cell in enumerate(notebook.cells):
        cell.id = f"cell-{number}"  # stable ids, so that a rebuild changes only what changed
    return notebook


def run(notebook, gate):
    """Run the notebook in a fresh kernel, in an empty folder with MNIST's files; check it."""
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
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    errors = [output for output in outputs if output.output_type == "error"]
    for output in outputs:  # warnings, and the note of a GPU that failed its test step
        if output.get("name") == "stderr":
            print(f"the notebook wrote to stderr: {output.text.strip()}", file=sys.stderr)
    pictures = sum("image/png" in output.get("data", {}) for cell in notebook.cells
                   for output in cell.get("outputs", []))
    at_work = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.outputs
               and cell.source.startswith("# At work")]
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      for output in cell.get("outputs", []))
    accuracy = re.search(r"test accuracy (\d+\.\d+)%", printed)
    problems = [f"{len(errors)} errors"] if errors else []
    if len(at_work) < 6 or pictures < 5:
        problems.append(f"output under {len(at_work)} sections and {pictures} pictures")
    if not accuracy or float(accuracy.group(1)) / 100 < gate:
        problems.append(f"test accuracy {accuracy and accuracy.group(1)}%, under the gate {gate}")
    print(f"ran the notebook: output under {len(at_work)} sections, {pictures} pictures, test "
          f"accuracy {accuracy and accuracy.group(1)}%")
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
    action.add_argument("--run", action="store_true", help="run docs/mnist.ipynb as it is")
    parser.add_argument("--gate", type=float, default=0.98, help="least test accuracy")
    args = parser.parse_args()
    if args.check:
        problems = check()
        if problems:
            print("docs/mnist.ipynb is stale: run python docs/make_notebook.py\n" +
                  "\n".join(problems[:3]), file=sys.stderr)
            return 1
        print("docs/mnist.ipynb holds what mnist.py makes")
        return 0
    notebook = nbformat.read(NOTEBOOK, as_version=4) if args.run else build()
    problems = run(notebook, args.gate)
    if problems:
        print("the notebook failed: " + "; ".join(problems), file=sys.stderr)
        return 1
    if not args.run:
        notebook.metadata.pop("widgets", None)
        nbformat.write(notebook, NOTEBOOK)
        print(f"wrote {NOTEBOOK.relative_to(ROOT)}, {NOTEBOOK.stat().st_size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
