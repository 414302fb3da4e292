"""How well does a trained mnist.py model read digits that are not from MNIST?

    python mnist.py                 # train the default model into outputs/ first
    python docs/own_digits.py       # then draw the test images and score them

It draws two sets of images into runs/own-digits/ (neither is part of the repository):
- font digits, 0-9 in 10 fonts that come with matplotlib, each drawn three ways, as a
  student's photo or drawing would look: dark ink on noisy, paper-toned JPEG; dark ink on a
  transparent PNG canvas; and white ink on black. Sizes and positions vary at random.
- real handwriting: scikit-learn's load_digits (1,797 digits of 8 x 8, values 0-16), scaled
  up to 64 x 64, in both polarities.
Then it reads every image back from disk and prints how many digits the model gets right with
mnist.py's preparation (prepare_digit) and with a plain resize straight to 28 x 28.
"""

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageFilter, ImageFont, ImageDraw
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnist  # noqa: E402

FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSerif", "DejaVuSerif-Bold",
         "DejaVuSansMono", "STIXGeneral", "STIXGeneralItalic", "cmr10", "cmss10")
FONT_FOLDER = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_digit(digit, font_name, style, rng):
    """One digit in one font on a canvas of random size, at a random size and position."""
    width, height = (int(side) for side in rng.integers(90, 320, size=2))
    font = ImageFont.truetype(str(FONT_FOLDER / f"{font_name}.ttf"),
                              int(min(width, height) * rng.uniform(0.4, 0.8)))
    left, top, right, bottom = font.getbbox(str(digit))
    x = rng.uniform(0.05 * width, max(0.05 * width, 0.95 * width - (right - left))) - left
    y = rng.uniform(0.05 * height, max(0.05 * height, 0.95 * height - (bottom - top))) - top
    if style == "white-on-black.png":
        image = Image.new("L", (width, height), 0)
        ImageDraw.Draw(image).text((x, y), str(digit), fill=255, font=font)
    elif style == "transparent.png":  # as a paint program saves it: dark ink, no background
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        ImageDraw.Draw(image).text((x, y), str(digit), fill=(20, 20, 20, 255), font=font)
    else:  # "photo.jpg": dark ink on paper-toned, slightly noisy, slightly blurred paper
        paper = rng.integers(180, 240)
        image = Image.new("RGB", (width, height), (int(paper), int(paper) - 8, int(paper) - 20))
        ink = int(rng.integers(10, 80))
        ImageDraw.Draw(image).text((x, y), str(digit), fill=(ink, ink, ink + 10), font=font)
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        noise = rng.normal(0, 6, (height, width, 1))
        image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))
    return image


def write_images(folder, seed=0):
    """Draw both sets into folder; return a list of (set, kind, path, label)."""
    rng = np.random.default_rng(seed)
    drawn = []
    (folder / "fonts").mkdir(parents=True, exist_ok=True)
    (folder / "load_digits").mkdir(parents=True, exist_ok=True)
    for font_name in FONTS:
        for digit in range(10):
            for style in ("photo.jpg", "transparent.png", "white-on-black.png"):
                path = folder / "fonts" / f"{digit}-{font_name}-{style}"
                font_digit(digit, font_name, style, rng).save(path, quality=80)
                drawn.append(("fonts", style, path, digit))
    handwriting = load_digits()
    for index, (pixels, digit) in enumerate(zip(handwriting.images, handwriting.target)):
        light = Image.fromarray((pixels * 255 / 16).astype(np.uint8))  # ink bright, as stored
        light = light.resize((64, 64), Image.Resampling.BILINEAR)
        for polarity, image in (("white-on-black", light), ("black-on-white", 255 - np.asarray(
                light))):
            path = folder / "load_digits" / f"{index:04d}-{digit}-{polarity}.png"
            Image.fromarray(np.asarray(image)).save(path)
            drawn.append(("load_digits", polarity, path, int(digit)))
    return drawn


def read_image(path):
    """The image in a file, read whole (these have no EXIF note to turn them, and 8 bits)."""
    with Image.open(path) as image:
        return image.copy()


def plain_resize(image):
    """What a first attempt does: grey, resized straight to 28 x 28, scaled to [0, 1]."""
    grey = image.convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"),
                        help="the folder that holds the trained model.pt and metrics.json")
    parser.add_argument("--images", type=Path, default=Path("runs/own-digits"),
                        help="where to draw the test images")
    parser.add_argument("--require", type=float, nargs=2, metavar=("FONTS", "HANDWRITING"),
                        help="exit 1 unless MNIST's preparation reads at least these fractions "
                        "of the two sets (CI uses 0.9 0.7)")
    args = parser.parse_args()
    model, (mean, std) = mnist.load_trained_model(args.output_dir)
    drawn = write_images(args.images)
    overall = {}
    print(f"model: {args.output_dir / 'model.pt'}")
    print(f"{'images':<33} {'count':>5} {'MNIST preparation':>18} {'plain resize':>13}")
    for name in ("fonts", "load_digits"):
        kinds = sorted({kind for set_name, kind, _, _ in drawn if set_name == name})
        for chosen_kind in kinds + ["all"]:
            chosen = [(path, label) for set_name, kind, path, label in drawn
                      if set_name == name and chosen_kind in (kind, "all")]
            labels = torch.tensor([label for _, label in chosen])
            images = [read_image(path) for path, _ in chosen]
            scores = []
            for prepare in (mnist.prepare_digit, plain_resize):
                digits = torch.stack([prepare(image) for image in images])
                predicted = mnist.predict(model, digits, mean, std).argmax(dim=1)
                scores.append((predicted == labels).float().mean().item())
            print(f"{name + ': ' + chosen_kind:<33} {len(chosen):>5} {scores[0]:>18.1%} "
                  f"{scores[1]:>13.1%}")
        overall[name] = scores[0]
    if args.require and not all(overall[name] >= low for name, low in
                                zip(("fonts", "load_digits"), args.require)):
        raise SystemExit(f"FAIL: MNIST's preparation read {overall}, below {args.require}")

if __name__ == "__main__":
    main()
