"""The trainer's parts, split along their seams; ``ddpmkit.train`` holds the public ``train()`` and the loop.

- ``data``:  the data order (a pure function of seed, epoch and step) and each rank's batch stream;
- ``state``: what a checkpoint holds (model, EMA, optimiser, grad scaler, RNGs, data position):
  building it, capturing it, restoring it, and the run folder's checkpoint files and model folders;
- ``step``:  one update (flip / t / eps draw, loss, NaN guard, clipping, optimiser step, EMA update);
- ``log``:   feedback: log lines, warnings, metrics.jsonl, TensorBoard, the progress bar.
"""
