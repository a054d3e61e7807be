"""Writes digits of the quickstart's test split as PNG files, to try the serving commands on.

    python tools/write_digits.py --out=runs/digits --count=20

Writes OUT/<label>/<index>.png (8x8 grayscale, the images the quickstart
model was tested on, never trained on) and prints how many it wrote.
Needs only numpy, scikit-learn and Pillow.
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image

flags.DEFINE_string("out", "runs/digits", "Folder to write the PNG files into.")
flags.DEFINE_integer("count", 20, "How many test images to write.", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    # The split of hmnas_keras.data.load_digits_arrays (without importing TensorFlow).
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype("uint8")
    _, test_x, _, test_y = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    count = min(FLAGS.count, len(test_x))
    for index in range(count):
        folder = os.path.join(FLAGS.out, str(test_y[index]))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(test_x[index]).save(os.path.join(folder, f"{index:04d}.png"))
    print(f"Wrote {count} digit images under {FLAGS.out}/<label>/")
    return 0


if __name__ == "__main__":
    app.run(main)
