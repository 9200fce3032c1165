"""Bench setup: the same environment rules as the tests (interpreter on CPU), plus shared-data paths."""

import os

import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
