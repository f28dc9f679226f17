"""One noise stream: a CPU generator gives the same eps whatever device the model is on.

``seeds.draw_standard_normal`` draws in float32 on the generator's device, then moves; the
bound (``calc_bpd_loop``), the training loss and ``evaluate_bpd`` (``ddpm eval bpd``) draw through
it, and ``evaluate_bpd`` seeds a CPU generator. The "meta" device stands in for a GPU: a tensor
there has a device but no data, and a CPU generator cannot draw on it directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.seeds import draw_standard_normal, sample_generators


def test_draw_is_the_cpu_stream_in_float32_moved_to_the_device():
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    got = draw_standard_normal((2, 3), torch.Generator().manual_seed(7), device=torch.device("cpu"),
                               dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, expected.double())
    g = torch.Generator().manual_seed(7)
    moved = draw_standard_normal((2, 3), g, device=torch.device("meta"), dtype=torch.float32)
    assert moved.device.type == "meta" and moved.shape == (2, 3)
    # the numbers were drawn from the CPU stream (which moved on), not on the target device
    ref = torch.Generator().manual_seed(7)
    torch.randn((2, 3), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_calc_bpd_loop_draws_each_timesteps_noise_from_the_stream():
    d = DiffusionConfig(num_timesteps=4).build()
    seen = []

    def model(x_t, t):  # records its input; predicts eps = 0
        seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t)

    x0 = torch.linspace(-1, 1, 2 * 1 * 2 * 2, dtype=torch.float64).view(2, 1, 2, 2)
    d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    for x_t, t in seen:  # t = 0, 1, 2, 3 in order, one draw of x0's shape each, float32 then cast
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).double()
        torch.testing.assert_close(x_t, d.q_sample(x0, t, noise=eps), rtol=0, atol=0)


def test_evaluate_bpd_seeds_a_cpu_generator_for_a_batch_on_any_device(monkeypatch):
    from ddpmkit.evaluate import bpd

    got = {}

    class Stub:
        num_timesteps = 3

        def calc_bpd_loop(self, model, x0, *, generator, **kw):
            got["generator"] = generator
            z = torch.zeros(x0.shape[0])
            return {"total_bpd": z, "prior_bpd": z, "vb": torch.zeros(x0.shape[0], 3),
                    "x0_mse": torch.zeros(x0.shape[0], 3)}

    x0 = torch.zeros(2, 1, 4, 4, device="meta")
    bpd._run_batch(None, Stub(), x0, seed=5, batch=2, clip_denoised=True, t_chunk=None)
    g = got["generator"]
    # ddpmkit.seeds' documented hash of (seed, Stream.BPD_BATCH = 4, batch), written out with numpy
    expected = int(np.random.SeedSequence([5, 4, 2]).generate_state(1, dtype=np.uint64)[0]) >> 1
    assert g.device.type == "cpu" and g.initial_seed() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_calc_bpd_loop_gives_the_cpu_numbers_on_cuda():
    d = DiffusionConfig(num_timesteps=10).build()
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)

    def model(x_t, t):
        return 0.1 * x_t

    cpu = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))
    gpu = d.calc_bpd_loop(model, x0.cuda(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu["total_bpd"].cpu(), cpu["total_bpd"], rtol=1e-5, atol=1e-5)


def test_one_noise_helper_for_the_samplers_and_the_losses():
    """Issue 12: the samplers, the chains and the losses draw with seeds.draw_standard_normal, not a copy."""
    from ddpmkit import chains, diffusion, sampling

    assert sampling.draw_standard_normal is chains.draw_standard_normal is draw_standard_normal
    assert diffusion.draw_standard_normal is draw_standard_normal
    gens = sample_generators(3, range(2))
    z = draw_standard_normal((2, 3), gens, device=torch.device("cpu"), dtype=torch.float64)
    for b in range(2):
        want = torch.randn((3,), generator=sample_generators(3, [b])[0], dtype=torch.float32)
        assert torch.equal(z[b], want.double())
