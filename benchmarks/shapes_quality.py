"""The numbers of docs/training.md's shapes16 recipe, from a finished run.

    PYTHONPATH=src:tests python benchmarks/shapes_quality.py RUN FOLDER

RUN is the ``ddpm train`` run directory (its metrics.jsonl, and RUN/samples-100/samples_*.npz
written by ``ddpm sample RUN --n 64 --steps 100 --output-dir RUN/samples-100``); FOLDER is the
training folder (tests/shapes.py's ``make_shapes_folder``). Prints the final loss, the median
steps/s over the log windows after the first (start-up) one, and ``shapes.clean_fraction`` of the
samples, of the training images and of as many uniform-noise images.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from shapes import clean_fraction


def main(run: Path, folder: Path) -> None:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sps = [r["steps_per_s"] for r in recs[1:] if "steps_per_s" in r]
    print(f"steps {recs[-1]['step']}, final loss {recs[-1]['loss']:.4f}, median steps/s (windows after "
          f"the first) {statistics.median(sps):.2f}, min {min(sps):.2f}, max {max(sps):.2f}")
    samples = np.load(next((run / "samples-100").glob("samples_*.npz")))["arr_0"]  # (N, H, W, 3) uint8
    real = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
    noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
    print(f"clean_fraction: samples {clean_fraction(samples):.3f} ({len(samples)}), "
          f"training folder {clean_fraction(real):.3f} ({len(real)}), "
          f"uniform noise {clean_fraction(noise):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
