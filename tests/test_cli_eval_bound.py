"""`ddpm eval bpd --timesteps K --variance V`: the bound through the chain asked for, recorded
in the result so that another chain into the same output is refused."""

from __future__ import annotations

import json
import shutil

import torch

from ddpmkit.analytic import reverse_chain
from ddpmkit.cli import main
from ddpmkit.data import open_source
from ddpmkit.models import load_model
from ddpmkit.respace import parse_timesteps


def test_the_bound_of_a_respaced_chain_with_each_variance(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    common = ["-q", "eval", "bpd", str(model), "--data", "digits", "--n", "8", "--batch-size", "8",
              "--timesteps", "4", "--gamma-data", "digits", "--gamma-samples", "8"]
    results = {}
    for var in ("fixedlarge", "fixedsmall", "analytic"):
        out = tmp_path / f"{var}.json"
        assert main([*common, "--variance", var, "--out", str(out)]) == 0
        results[var] = json.loads(out.read_text())
        assert results[var]["settings"]["variance"] == var
        assert results[var]["settings"]["timesteps"] == parse_timesteps(load_model(model).diffusion.num_timesteps, 4)
    assert len({round(r["bpd"], 6) for r in results.values()}) == 3  # three different chains
    loaded = load_model(model)
    chain = reverse_chain(loaded.diffusion, results["fixedlarge"]["settings"]["timesteps"], "fixedlarge")
    x0 = open_source("digits", resolution=8, channels=1, split="test").get_batch(list(range(8)))
    from ddpmkit.evaluate.bpd import evaluate_bpd

    with torch.inference_mode():
        ref = evaluate_bpd(loaded.unet, chain, [x for x in x0], batch_size=8)
    assert abs(ref["bpd"] - results["fixedlarge"]["bpd"]) < 1e-9
    capsys.readouterr()
    assert main([*common, "--variance", "fixedsmall", "--out", str(tmp_path / "fixedlarge.json")]) == 2
    assert "other settings" in capsys.readouterr().err
