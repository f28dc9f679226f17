"""Bits/dim over a data set: the per-term sums of calc_bpd_loop, the single-image oracle, resume."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from json_inputs import FAST, _paths, _replaced, json_bytes, json_values, one_line

from ddpmkit.data import load_digits_uint8
from ddpmkit.diffusion import DiffusionConfig, VarType
from ddpmkit.evaluate.bpd import _record_problem, evaluate_bpd, rate_distortion_table, summarize

LN2 = math.log(2.0)


class _Repeat(torch.utils.data.Dataset):
    """n copies of one image (C, H, W)."""

    def __init__(self, x: torch.Tensor, n: int) -> None:
        self.x, self.n = x, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x


class _TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.temb = torch.nn.Embedding(1000, 1)

    def forward(self, x, t):
        return self.conv(x) + self.temb(t).view(-1, 1, 1, 1)


def _digits(n: int) -> torch.utils.data.TensorDataset:
    a, _ = load_digits_uint8("test")
    return torch.from_numpy(a[:n]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (n, 1, 8, 8)


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i]


def test_bpd_equals_the_per_term_sums_of_calc_bpd_loop():
    d = DiffusionConfig(num_timesteps=50, beta_end=0.2).build()
    x = _digits(10)
    model = _TinyModel().eval()
    res = evaluate_bpd(model, d, _Tensors(x), batch_size=4, t_chunk=10, seed=3)
    # the same batches through calc_bpd_loop directly, with the documented per-batch generators
    totals, priors, vbs, mses = [], [], [], []
    for b, s in enumerate(range(0, 10, 4)):
        seed = int(np.random.SeedSequence([3, 4, b]).generate_state(1, dtype=np.uint64)[0]) >> 1
        g = torch.Generator().manual_seed(seed)  # ddpmkit.seeds: (seed, Stream.BPD_BATCH = 4, b)
        out = d.calc_bpd_loop(model, x[s:s + 4], t_chunk=10, generator=g)
        totals.append(out["total_bpd"]), priors.append(out["prior_bpd"])
        vbs.append(out["vb"]), mses.append(out["x0_mse"])
    total, prior = torch.cat(totals).double(), torch.cat(priors).double()
    vb, x0_mse = torch.cat(vbs).double(), torch.cat(mses).double()
    assert res["num_examples"] == 10
    assert res["bpd"] == pytest.approx(float(total.mean()), rel=1e-12)
    assert res["prior_bpd"] == pytest.approx(float(prior.mean()), rel=1e-12)
    assert res["decoder_bpd"] == pytest.approx(float(vb[:, 0].mean()), rel=1e-12)
    assert res["sum_kl_bpd"] == pytest.approx(float(vb[:, 1:].sum(1).mean()), rel=1e-6)
    # the breakdown adds up: L_T + sum L_{t-1} + L_0 = total
    assert res["prior_bpd"] + res["sum_kl_bpd"] + res["decoder_bpd"] == pytest.approx(res["bpd"], rel=1e-6)
    assert res["bpd_stderr"] == pytest.approx(float(total.std() / math.sqrt(10)), rel=1e-9)
    # rate / distortion: rate at t = 1 is everything but L_0; at t = T it is L_T alone
    rate = res["by_t"]["rate"]
    assert rate[0] == pytest.approx(res["bpd"] - res["decoder_bpd"], rel=1e-6)
    assert rate[-1] == pytest.approx(res["prior_bpd"], rel=1e-12)
    assert np.all(np.diff(rate) <= 0)
    np.testing.assert_allclose(res["by_t"]["distortion"], np.sqrt(x0_mse.mean(0).numpy()) * 127.5, rtol=1e-9)
    rows = rate_distortion_table(res, rows=5)
    assert [r[0] for r in rows] == [50, 40, 30, 20, 10]
    assert rows[0][1] == rate[0] and rows[1][1] == rate[10] and rows[-1][2] == res["by_t"]["distortion"][40]


def _oracle_terms(x_star: np.ndarray, betas: np.ndarray) -> dict[str, float]:
    """The bound's terms for data = {x*} and the optimal eps-predictor, in closed form (fixedlarge).

    With eps predicted exactly, pred_x0 = x* and the model mean is the posterior mean, so
    L_{t-1} is the KL between two Gaussians with equal means: 0.5 (log(s2 / bt) + bt / s2 - 1);
    L_T = KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1)); L_0 = -log P(bin of x* | N(x*, s2_1)).
    """
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    bt = betas * (1 - abar_prev) / (1 - abar)  # beta-tilde, eq. (7)
    s2 = np.append(bt[1], betas[1:])  # fixedlarge, the first variance from beta-tilde_2
    kl = 0.5 * (np.log(s2[1:] / bt[1:]) + bt[1:] / s2[1:] - 1) / LN2  # (T-1,) per dim, any x*
    prior = np.mean(0.5 * (-1 - np.log(1 - abar[-1]) + (1 - abar[-1]) + abar[-1] * x_star**2)) / LN2
    z = (1 / 255) / math.sqrt(s2[0])
    edge = (x_star <= -0.999) | (x_star >= 0.999)
    p = np.where(edge, scipy.stats.norm.cdf(z), scipy.stats.norm.cdf(z) - scipy.stats.norm.cdf(-z))
    decoder = float(np.mean(-np.log(p)) / LN2)
    return {"prior": float(prior), "sum_kl": float(kl.sum()), "decoder": decoder,
            "total": float(prior + kl.sum() + decoder)}


def test_single_image_oracle_gives_the_analytic_bound():
    cfg = DiffusionConfig()  # the paper's T = 1000, linear betas, eps, fixedlarge
    assert cfg.var_type is VarType.FIXED_LARGE
    d = cfg.build()
    x_star = _digits(1)[0]  # (1, 8, 8), gray levels incl. -1 and 1
    sab = d.sqrt_alphas_cumprod
    s1m = d.sqrt_one_minus_alphas_cumprod

    def oracle(x_t, t):  # the optimal eps-predictor for data = {x*}
        x64 = x_t.double()
        eps = (x64 - sab[t].view(-1, 1, 1, 1) * x_star.double()) / s1m[t].view(-1, 1, 1, 1)
        return eps.to(x_t.dtype)

    res = evaluate_bpd(oracle, d, _Repeat(x_star.double(), 3), batch_size=3, t_chunk=250)
    ref = _oracle_terms(x_star.double().numpy(), d.betas.numpy())
    assert res["prior_bpd"] == pytest.approx(ref["prior"], rel=1e-9)
    assert res["sum_kl_bpd"] == pytest.approx(ref["sum_kl"], rel=1e-6)
    assert res["decoder_bpd"] == pytest.approx(ref["decoder"], rel=1e-6)
    assert res["bpd"] == pytest.approx(ref["total"], rel=1e-6)
    assert res["distortion_rmse"] < 1e-6  # x0 is predicted exactly at every t
    assert res["bpd_stderr"] < 1e-9  # the same value for every copy, whatever the noise


def test_resume_from_a_partial_file_gives_the_uninterrupted_result(tmp_path):
    d = DiffusionConfig(num_timesteps=20, beta_end=0.3).build()
    x = _digits(9)
    model = _TinyModel().eval()
    full = evaluate_bpd(model, d, _Tensors(x), batch_size=2, seed=1, partial_path=tmp_path / "a.jsonl")

    calls = {"n": 0}
    forward = model.forward

    def interrupted(x_t, t):
        calls["n"] += 1
        if calls["n"] > 2 * 20:  # dies in the third batch
            raise KeyboardInterrupt
        return forward(x_t, t)

    part = tmp_path / "b.jsonl"
    model.forward = interrupted  # the same module (the same weights' SHA-256), interrupted
    with pytest.raises(KeyboardInterrupt):
        evaluate_bpd(model, d, _Tensors(x), batch_size=2, seed=1, partial_path=part)
    del model.forward
    lines = part.read_text().splitlines()
    assert len(lines) == 1 + 2 and json.loads(lines[0])["format"] == "ddpmkit.bpd_partial"
    with open(part, "a") as f:
        f.write('{"batch": 2, "torn')  # a line cut short by the interruption
    with pytest.warns(RuntimeWarning, match="b.jsonl line 4: torn"):
        resumed = evaluate_bpd(model, d, _Tensors(x), batch_size=2, seed=1, partial_path=part)
    assert resumed["bpd"] == full["bpd"]
    assert resumed["by_t"] == full["by_t"]
    assert len(part.read_text().splitlines()) == 1 + 5
    with pytest.raises(ValueError, match="other settings"):
        evaluate_bpd(model, d, _Tensors(x), batch_size=3, seed=1, partial_path=part)
    # a partial file of version 1 (its batches drew noise from seed * 1_000_003 + b, before
    # ddpmkit.seeds) is refused, not continued with other noise
    header = json.loads(lines[0])
    assert header["version"] == 2
    old = tmp_path / "v1.jsonl"
    batches = part.read_text().splitlines()[1:3]
    old.write_text("\n".join([json.dumps({**header, "version": 1}), *batches]) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        evaluate_bpd(model, d, _Tensors(x), batch_size=2, seed=1, partial_path=old)


def test_bad_arguments():
    d = DiffusionConfig(num_timesteps=10).build()
    with pytest.raises(ValueError, match="n must be between 1 and the 4"):
        evaluate_bpd(_TinyModel(), d, _Tensors(_digits(4)), n=5)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_bpd(_TinyModel(), d, _Tensors(_digits(4)), batch_size=0)


def test_the_partial_header_holds_the_weights_and_data_hashes(tmp_path):
    d = DiffusionConfig(num_timesteps=5).build()
    x = _digits(4)
    model = _TinyModel().eval()
    part = tmp_path / "p.jsonl"
    res = evaluate_bpd(model, d, _Tensors(x), batch_size=2, partial_path=part)
    header = json.loads(part.read_text().splitlines()[0])
    assert header == res["settings"]
    assert len(header["weights_sha256"]) == 64 and len(header["data_sha256"]) == 64
    bias = model.conv.bias.detach().clone()
    with torch.no_grad():
        model.conv.bias.add_(0.5)  # the same object, other weights
    with pytest.raises(ValueError, match="other settings.*weights_sha256"):
        evaluate_bpd(model, d, _Tensors(x), batch_size=2, partial_path=part)
    with torch.no_grad():
        model.conv.bias.copy_(bias)
    with pytest.raises(ValueError, match="other settings.*data_sha256"):
        evaluate_bpd(model, d, _Tensors(x.flip(0)), batch_size=2, partial_path=part)
    assert evaluate_bpd(model, d, _Tensors(x), batch_size=2, partial_path=part)["bpd"] == res["bpd"]


_BPD_HOLDER = """
import sys, time, torch
sys.path[:0] = sys.argv[2:]
from test_bpd import _TinyModel, _Tensors, _digits
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.evaluate.bpd import evaluate_bpd
model = _TinyModel().eval()
def stall(x, t):
    print("started", flush=True)
    time.sleep(600)
model.forward = stall
evaluate_bpd(model, DiffusionConfig(num_timesteps=5).build(), _Tensors(_digits(4)), batch_size=2,
             partial_path=sys.argv[1])
"""


def test_a_second_evaluation_into_the_same_partial_file_is_refused(tmp_path):
    """Two `ddpm eval bpd` into one --out would interleave their batches."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    part = tmp_path / "p.jsonl"
    here = str(Path(__file__).parent)
    holder = subprocess.Popen([sys.executable, "-c", _BPD_HOLDER, str(part), here, *sys.path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "started"
        with pytest.raises(ValueError, match=f"p.jsonl is in use by another ddpmkit process.*{holder.pid}@"):
            evaluate_bpd(_TinyModel().eval(), DiffusionConfig(num_timesteps=5).build(), _Tensors(_digits(4)),
                         batch_size=2, partial_path=part)
        assert len(part.read_text().splitlines()) == 1  # nothing appended by the refused one
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert os.path.exists(part)
    assert evaluate_bpd(_TinyModel().eval(), DiffusionConfig(num_timesteps=5).build(), _Tensors(_digits(4)),
                        batch_size=2, partial_path=part)["num_examples"] == 4  # a dead holder's lock is stale


# ------------------------------------------------------------------------- bits/dim partial files
class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A finished 3-batch bits/dim partial file of 5 tiny examples, and how it was made."""
    from ddpmkit.diffusion import DiffusionConfig

    path = tmp_path_factory.mktemp("bpd") / "p.jsonl"
    x = torch.linspace(-1, 1, 5 * 4).reshape(5, 1, 2, 2)
    d = DiffusionConfig(num_timesteps=3).build()

    def run_it():
        return evaluate_bpd(_Zero(), d, list(x), batch_size=2, partial_path=path)
    return path, run_it, run_it()


@FAST
@given(data=st.data())
def test_a_bits_dim_partial_file_is_continued_redone_or_refused(partial, data):
    path, run_it, full = partial
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    k = data.draw(st.integers(0, len(lines) - 1))
    where = data.draw(st.sampled_from(sorted(_paths(lines[k]), key=str)))
    edited = [*lines[:k], _replaced(lines[k], where, data.draw(json_values)), *lines[k + 1:]]
    text = [json.dumps(x).encode() for x in edited]
    if data.draw(st.booleans()):
        text[k] = data.draw(json_bytes).replace(b"\n", b" ")
    path.write_bytes(b"\n".join(text) + b"\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = run_it()
    except ValueError as e:  # the header changed: the existing refusal
        one_line(e)
        assert k == 0 and "other settings" in str(e)
    else:  # a record that fails the check is redone; one that passes it is used as it stands
        records = [json.loads(x) for x in path.read_text().splitlines()[1:]]
        assert [_record_problem(r, b, got["settings"]) for b, r in enumerate(records)] == [None] * 3
        summary = {k: v for k, v in got.items() if k not in ("seconds", "settings")}
        # compared as JSON text, so that a NaN (huge finite values overflow the mean) equals itself
        assert json.dumps(summary, sort_keys=True) == json.dumps(summarize(records, num_timesteps=3),
                                                                 sort_keys=True)
    finally:
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))


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


VB = [0.5, 1.0, 2.0, 3.0]  # L_0 (decoder), L_1, L_2, L_3 in bits/dim


PRIOR = 0.25  # L_T


RATE = [6.25, 5.25, 3.25, 0.25]  # L_T + sum_{s > i} L_s, by hand


DIST = [1.0, 2.0, 3.0, 4.0]  # 127.5 sqrt(x0_mse)


X0_MSE = [(d / 127.5) ** 2 for d in DIST]


ROWS = [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]  # max(1, round(T (10 - i) / 10)) for T = 4, i = 0..9


def test_rate_distortion_by_t_by_hand():
    from ddpmkit.evaluate.bpd import rate_distortion_by_t

    rate, dist = rate_distortion_by_t(np.array(VB), np.array(X0_MSE), PRIOR)
    np.testing.assert_allclose(rate, RATE, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dist, DIST, rtol=1e-12)


def test_eval_bpd_summary_and_figure_agree_with_the_hand_written_values():
    from ddpmkit.evaluate.bpd import rate_distortion, rate_distortion_table, summarize

    s = summarize([{"total_bpd": [sum(VB) + PRIOR] * 2, "prior_bpd": [PRIOR] * 2,
                    "vb_sum": [2 * v for v in VB], "x0_mse_sum": [2 * m for m in X0_MSE]}], num_timesteps=4)
    assert s["by_t"]["rate"] == pytest.approx(RATE) and s["by_t"]["distortion"] == pytest.approx(DIST)
    assert s["rate_bpd"] == pytest.approx(6.25) and s["distortion_rmse"] == pytest.approx(1.0)
    assert [k for k, _, _ in rate_distortion_table(s)] == ROWS

    class Stub:  # a diffusion whose bound terms are the example's, for 2 images
        def calc_bpd_loop(self, model, x0, **kw):
            rep = lambda v: torch.tensor([v, v], dtype=torch.float64)  # noqa: E731
            return {"vb": rep(VB), "x0_mse": rep(X0_MSE), "prior_bpd": torch.full((2,), PRIOR),
                    "total_bpd": torch.full((2,), sum(VB) + PRIOR)}

    rd = rate_distortion(None, Stub(), torch.zeros(2, 1, 2, 2))
    assert rd["rate"] == pytest.approx(RATE) and rd["distortion_rmse"] == pytest.approx(DIST)
    assert [row["reverse_time"] for row in rd["table"]] == ROWS
    assert [row["rate_bpd"] for row in rd["table"]] == pytest.approx([RATE[4 - k] for k in ROWS])


def test_table4_rows_are_the_papers_reverse_times_and_stay_in_range_for_small_T():
    from ddpmkit.evaluate.bpd import table4_reverse_times

    assert table4_reverse_times(1000) == [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]  # Table 4
    assert table4_reverse_times(4) == [4, 4, 3, 3, 2, 2, 2, 1, 1, 1]  # round half even, at least 1
