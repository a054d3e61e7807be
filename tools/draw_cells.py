"""Draws the cells and search statistics of an existing workdir (paper Fig. 4–6).

    python tools/draw_cells.py --workdir=runs/quickstart

Writes WORKDIR/pictures/: cell_<type>.png/.svg/.dot, incoming_edges.png,
ops_per_edge.png and, if the workdir ran the supernet phase, edge_weights.png
(see hmnas_keras.pictures). The pipeline draws the same pictures itself.
"""

import os
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "A run's directory holding architecture.json (required).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory of a searched run.")
    from hmnas_keras.architecture.architecture_json import ArchitectureError
    from hmnas_keras.pipeline.pictures import draw_workdir
    from hmnas_keras.pipeline.workdir import Workdir

    workdir = Workdir(FLAGS.workdir)
    if not os.path.exists(workdir.architecture):
        print(
            f"Error: {workdir.architecture} does not exist: run the mask phase (or a "
            "--derivation) first.",
            file=sys.stderr,
        )
        return 1
    try:
        written = draw_workdir(workdir)
    except ArchitectureError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    app.run(main)
