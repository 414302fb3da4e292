"""Draw a digit and watch the trained network read it as you draw: a page in your browser.

    pip install -r docs/draw-requirements.txt   # Gradio, which requirements.txt leaves out
    python mnist.py                             # train the default model into outputs/ first
    python docs/draw.py                         # then open the address that it prints
    %run docs/draw.py                           # in Jupyter or Colab: the page shows below the cell

--output-dir DIR reads DIR/model.pt instead. The page is served on 127.0.0.1 from port 7860, or
the next free one: Gradio's GRADIO_SERVER_NAME and GRADIO_SERVER_PORT change that. It fetches
nothing from the internet; --share asks Gradio's servers for a public link to it.
"""

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

# Gradio would otherwise report usage statistics and ask its servers for its latest version.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
try:
    import gradio as gr
except ImportError:
    gr = None
if gr is None or tuple(map(int, gr.__version__.split(".")[:2])) < (6, 20):  # the file says why
    raise SystemExit("draw.py needs Gradio 6.20+: pip install -r docs/draw-requirements.txt")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist  # noqa: E402

CANVAS = 280  # pixels a side, 10 times MNIST's 28
# The brush's radius in pixels. Its strokes, 20 wide, become 2 to 3 pixels wide when a digit drawn
# 150 to 200 pixels tall is scaled to MNIST's 20: about as wide as MNIST's own strokes.
BRUSH = 10
PROMPT = "Draw a digit in the box"
# Gradio's Sketchpad starts, and starts again after "Clear canvas", with no tool chosen: it says
# "select the draw tool to start". Whenever it says so, this clicks its first tool, the brush.
CHOOSE_BRUSH = """() => setInterval(() => {
    if (document.querySelector("#canvas .empty"))
        document.querySelector("#canvas .toolbar-wrap button")?.click();
}, 100)"""
WHY = ("The drawing is prepared as MNIST's digits were, white on black, 20 pixels on its longer "
       "side and centred by its centre of mass (section 13 of mnist.py), because a model knows "
       "only data like its training data: for the default model a plain resize to 28 x 28 reads "
       "11 % of printed digits and 22 % of scanned handwriting, this preparation 95 % and 83 % "
       "(docs/RESULTS.md).")


def page(model, mean, std):
    """The page: a canvas, and what the network reads there, updated after every stroke."""

    def read(drawing):
        if drawing is None or drawing["composite"] is None:
            return PROMPT, None, None
        try:  # the lesson's own preparation and prediction, as `mnist.py --predict` uses them
            digit = mnist.prepare_digit(drawing["composite"], name="the canvas")
        except ValueError:  # no ink: the canvas is empty, or everything was erased
            return PROMPT, None, None
        probabilities = mnist.predict(model, digit[None], mean, std)[0]  # ten, summing to 1
        best = int(probabilities.argmax())
        seen = Image.fromarray(digit.mul(255).round().byte().numpy())  # white on black, 28 x 28
        return (f"{best} ({probabilities[best]:.1%})",  # as `mnist.py --predict` prints it
                {str(d): float(p) for d, p in enumerate(probabilities)},
                seen.resize((CANVAS, CANVAS), Image.Resampling.NEAREST))  # each pixel a square

    with gr.Blocks(title="Draw a digit") as blocks:
        gr.Markdown("## Draw a digit: the network reads it after every stroke\n"
                    "Draw one digit, large. The bin above the canvas clears it.")
        with gr.Row():  # on a narrow screen, the probabilities move below the rest
            canvas = gr.Sketchpad(
                label="Your digit", elem_id="canvas", type="pil", canvas_size=(CANVAS, CANVAS),
                layers=False, transforms=(), buttons=[], min_width=CANVAS + 100,
                brush=gr.Brush(default_size=BRUSH, colors=["#000000"], color_mode="fixed"))
            with gr.Column(min_width=CANVAS):
                answer = gr.Textbox(PROMPT, label="The network reads", elem_id="answer")
                seen = gr.Image(label="What the network sees: 28 x 28 pixels", elem_id="seen",
                                format="png", buttons=[], height=CANVAS)
            with gr.Column(min_width=CANVAS):
                chart = gr.Label(label="Its ten probabilities", elem_id="chart",
                                 num_top_classes=10, show_heading=False)
        gr.Markdown(WHY)
        # After each stroke; no spinner, and while one reading runs only the latest waits.
        canvas.change(read, canvas, [answer, chart, seen], show_progress="hidden",
                      trigger_mode="always_last")
        blocks.load(None, js=CHOOSE_BRUSH)
    return blocks


def main():
    parser = argparse.ArgumentParser(prog="draw.py", description=__doc__.split("\n\n")[0])
    parser.error = lambda message: parser.exit(2, f"draw.py: error: {message} (see --help)\n")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"),
                        help="the folder that holds the trained model.pt (default: outputs)")
    parser.add_argument("--share", action="store_true",
                        help="also make a public link, through Gradio's servers")
    args = parser.parse_args(mnist.command_line_flags())  # none of a notebook kernel's own
    try:
        model, (mean, std) = mnist.load_trained_model(args.output_dir)
    except mnist.UserError as error:  # no model.pt, or not this script's: bad input
        print(f"draw.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    blocks = page(model, mean, std)
    # No footer (its links lead to Gradio's API and settings pages), and quiet, as this prints the
    # address. In a notebook launch() shows the page below the cell, in a frame
    # 720 pixels tall, and the cell ends; elsewhere the script serves the page until Ctrl+C.
    blocks.launch(share=args.share, footer_links=[], quiet=True, height=720,
                  prevent_thread_lock=True)
    print(f"draw.py: the page is at {blocks.local_url}")  # and Gradio prints a --share link
    if "ipykernel" not in sys.modules:
        blocks.block_thread()


if __name__ == "__main__":
    main()
