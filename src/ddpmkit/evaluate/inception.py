"""The TF-Inception-compatible feature network for FID and IS, from torch-fidelity.

torch-fidelity's ``FeatureExtractorInceptionV3`` reimplements the TF graph of
``inception-2015-12-05`` (the network of the original FID and IS code) in plain torch, including
TF1's bilinear resize to 299x299, and its test suite checks FID/IS against the TF reference to
machine precision (tests/tf1/numerical_precision). pytorch-fid builds on torchvision's Inception,
which cannot be installed beside this torch; torch-fidelity's Inception does not need it.

Weights: ``weights-inception-2015-12-05-6726825d.pth`` (the TF weights converted by torch-fidelity),
taken from a path given by the user or from torch-fidelity's cache (torch.hub's checkpoint folder),
and verified by SHA-256 before they are loaded. Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

__all__ = [
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "InceptionFeatures",
    "default_inception_path",
    "find_inception_weights",
    "sha256_file",
]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub names files <name>-<first 8 hex digits of the sha256>.<ext> (torch-fidelity checks the
# prefix on download); the full digest is the one recorded for this file by its users.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_ENV = "DDPMKIT_INCEPTION_WEIGHTS"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_inception_path() -> Path:
    """Where torch-fidelity caches the weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def find_inception_weights(
    path: str | os.PathLike | None = None, *, download: bool = False, expected_sha256: str = INCEPTION_SHA256
) -> Path:
    """The verified Inception weights file: ``path``, else $DDPMKIT_INCEPTION_WEIGHTS, else the cache.

    Raises ValueError naming the URL to fetch and the path to put it at when the file is missing
    (and ``download`` is False), and when its SHA-256 is not ``expected_sha256``.
    """
    if path is None and os.environ.get(WEIGHTS_ENV):
        path = os.environ[WEIGHTS_ENV]
    target = Path(path).expanduser() if path is not None else default_inception_path()
    if not target.is_file():
        if not download:
            raise ValueError(
                f"Inception weights not found at {target}. Fetch {INCEPTION_URL} (sha256 "
                f"{expected_sha256}) and put it at {target}, or pass --inception-weights FILE, "
                "or rerun with --download-weights"
            )
        _download(target, expected_sha256)
    digest = sha256_file(target)
    if digest != expected_sha256:
        raise ValueError(
            f"{target} has sha256 {digest}, expected {expected_sha256} "
            f"(the file from {INCEPTION_URL}); delete it and fetch it again"
        )
    return target


def _download(target: Path, expected_sha256: str) -> None:
    """Fetch the weights to ``target``; a network or disk failure is one ValueError line."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), hash_prefix=expected_sha256[:8],
                                       progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as err:  # URLError/HTTPError are OSErrors; a bad hash: RuntimeError
        reason = getattr(err, "reason", None) or err
        raise ValueError(f"could not download the Inception weights from {INCEPTION_URL} ({reason}); "
                         f"fetch the file elsewhere and put it at {target}, or pass "
                         "--inception-weights FILE") from None


FIDELITY_INSTALL = "pip install --no-deps 'torch-fidelity>=0.3,<0.5'"


def _torch_fidelity_inception_class() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3, importable without a working torchvision.

    The package's ``__init__`` imports its CLIP/VGG/DINOv2 extractors, which need torchvision; the
    InceptionV3 module itself imports only torch and torch-fidelity's helpers. When the package's
    ``__init__`` fails for any reason (torchvision missing, or one built for another torch, which
    raises a RuntimeError), the package is registered without running its ``__init__`` and the
    module is imported. Any failure of that module becomes one ValueError line.
    """
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise ValueError(f"FID and IS need torch-fidelity's Inception: {FIDELITY_INSTALL} "
                         "(--no-deps keeps your torch: a plain install pulls torchvision and another torch)")
    try:
        importlib.import_module("torch_fidelity")
    except Exception:  # noqa: BLE001 - any import failure of the package's __init__ (see above)
        sys.modules.pop("torch_fidelity", None)
        pkg = importlib.util.module_from_spec(spec)  # the package, its __init__ not executed
        sys.modules["torch_fidelity"] = pkg
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        return module.FeatureExtractorInceptionV3
    except Exception as err:  # noqa: BLE001 - shown as one line
        raise ValueError(f"torch-fidelity's Inception cannot be imported ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); reinstall it with "
                         f"{FIDELITY_INSTALL}") from None


class InceptionFeatures(torch.nn.Module):
    """uint8 images -> Inception pool3 features (2048) and unbiased logits (1008), in eval mode.

    ``forward(x)``: x (B, C, H, W) uint8, C in {1, 3} (gray is repeated to RGB); any size (TF1
    bilinear resize to 299 inside). Returns {"pool": (B, 2048) float32, "logits": (B, 1008) float32};
    "logits" are pool3 @ W without the bias, the input of the original Inception Score code.
    """

    feature_dim = 2048
    name = "inception-v3-tf-2015-12-05"

    def __init__(self, weights: str | os.PathLike | None = None, *, download: bool = False,
                 expected_sha256: str = INCEPTION_SHA256) -> None:
        super().__init__()
        path = find_inception_weights(weights, download=download, expected_sha256=expected_sha256)
        torch.load(path, map_location="cpu", weights_only=True)  # a plain state dict, nothing pickled
        cls = _torch_fidelity_inception_class()
        self.net = cls(self.name, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
        self.net.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        super().train(False)  # batch norm always uses its running statistics
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images shaped (B, 1 or 3, H, W), got {x.dtype} "
                             f"{tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        pool, logits = self.net(x.contiguous())
        return {"pool": pool, "logits": logits}
