"""Weights in and out: diffusers folders (``interop.diffusers``) and the authors' TF checkpoints
(``interop.tf_checkpoint``). Import the submodule you need; this package imports nothing heavy."""
