"""Weights in and out: diffusers folders and the authors' TF checkpoints (maps only).

``interop.diffusers`` and ``interop.tf_checkpoint``: import the submodule you need; this package
imports nothing heavy."""
