"""Issue 27.10: a torn reproduce stage file is redone with a warning naming it, and a stage whose
inputs (the weights it evaluated, the samples it read) changed is recomputed."""

from __future__ import annotations

import json

import pytest

from ddpmkit.reproduce.stages import Stages


class _NoBar:
    def update(self, n):
        pass

    def set_description(self, s):
        pass


def _stages(tmp_path, resume=True):
    return Stages(tmp_path, {"sizes": {"steps": 2}, "version": 1}, resume=resume, bar=_NoBar())


@pytest.mark.parametrize("torn", [b"", b'{"format": "ddpmkit.reproduce_stage", "sett', b"[1, 2]",
                                  b'{"settings": {"sizes": {"steps": 2}, "version": 1}}',
                                  b'{"settings": {"sizes": {"steps": 2}, "version": 1}, "result": 3}'])
def test_a_torn_stage_file_is_redone_with_a_warning(tmp_path, torn):
    _stages(tmp_path).run("a", 1.0, lambda: {"x": 1})
    path = tmp_path / "stages" / "a.json"
    path.write_bytes(torn)
    with pytest.warns(RuntimeWarning, match=f"{path}.*redone"):
        assert _stages(tmp_path).run("a", 1.0, lambda: {"x": 2}) == {"x": 2}
    assert json.loads(path.read_text())["result"] == {"x": 2}
    assert _stages(tmp_path).load("a") == {"x": 2}


def test_a_torn_stage_file_without_resume_is_still_refused(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.json").write_bytes(b"{")
    with pytest.raises(ValueError, match="--resume"):
        _stages(tmp_path, resume=False).run("a", 1.0, lambda: {"x": 2})


def test_a_stage_is_recomputed_when_its_inputs_change(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"n": len(calls)}

    assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "aa"}) == {"n": 1}
    assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "aa"}) == {"n": 1}
    with pytest.warns(RuntimeWarning, match="e.json.*model_sha256.*redone"):
        assert _stages(tmp_path).run("e", 1.0, work, inputs=lambda: {"model_sha256": "bb"}) == {"n": 2}
    saved = json.loads((tmp_path / "stages" / "e.json").read_text())
    assert saved["inputs"] == {"model_sha256": "bb"}


def test_every_evaluation_stage_records_the_weights_it_read(tmp_path):
    from ddpmkit.reproduce import reproduce_digits
    from ddpmkit.reproduce.plan import ReproduceSizes

    tiny = ReproduceSizes(name="tiny", smoke=True, steps=2, num_timesteps=10, bpd_examples=4, bpd_batch=4,
                          t_chunk=5, num_samples=8, recon_examples=1, progressive_examples=1, unet_ch=32)
    reproduce_digits(tmp_path, seeds=1, sizes=tiny, progress=False)
    files = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "stages").glob("*.json")}
    for name, d in files.items():
        if name.startswith(("eval_", "figures_")):
            assert len(d["inputs"]["model_sha256"]) == 64 and d["inputs"]["diffusion"]["num_timesteps"] > 1
        elif name.startswith("nn_"):
            assert len(d["inputs"]["samples_sha256"]) == 64
    assert sum(name.startswith("eval_") for name in files) == 7
