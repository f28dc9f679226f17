"""The data order (training.data) as train() sees it: each epoch once, seeded, kept over resume."""

from __future__ import annotations

import numpy as np
from tiny_runs import N_IMAGES, config

from ddpmkit.train import train


# ------------------------------------------------------------------------- data order
def test_each_epoch_sees_every_example_once_and_seeds_give_different_orders(tmp_path, noise_npz, rec):
    steps = 3 * N_IMAGES // 8  # three epochs of batch 8
    train(config(noise_npz, steps=steps, seed=1), tmp_path / "a", progress=False)
    order_a = np.concatenate(rec.indices)
    rec.indices.clear()
    train(config(noise_npz, steps=steps, seed=2), tmp_path / "b", progress=False)
    order_b = np.concatenate(rec.indices)
    for order in (order_a, order_b):
        assert order.shape == (3 * N_IMAGES,)
        epochs = order.reshape(3, N_IMAGES)
        for e in epochs:
            assert sorted(e.tolist()) == list(range(N_IMAGES))
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert not np.array_equal(order_a, order_b)


def test_resume_keeps_the_data_order(tmp_path, noise_npz, rec):
    steps = 5  # 40 examples: the resume point (step 2) and the end straddle an epoch boundary
    train(config(noise_npz, steps=steps, seed=3), tmp_path / "straight", progress=False)
    straight = np.concatenate(rec.indices)
    rec.indices.clear()
    run = tmp_path / "cut"
    train(config(noise_npz, steps=2, seed=3, checkpoint_every=1), run, progress=False)
    train(config(noise_npz, steps=steps, seed=3), run, resume="auto", progress=False)
    np.testing.assert_array_equal(np.concatenate(rec.indices), straight)
