"""Shared fixtures: small random models of each architecture saved with ``save_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from biaslens import data as _data

#: the public benchmark files and the GPT-2 BPE, shipped with the package (no ../shared needed)
SHARED_DATA = _data.ROOT
GPT2_BPE = _data.GPT2_BPE


def shared(path: str) -> Path:
    """A shipped data file (:mod:`biaslens.data`); missing means a broken install: fail."""
    return _data.path(path)


def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE, built offline from the shipped files."""
    from biaslens.testing import gpt2_tokenizer as build

    return build(GPT2_BPE)


def _build(arch: str, folder: Path, seed: int = 0):
    """The suite's small random models (3 layers, d_model 32, 128 positions, real GPT-2 BPE)."""
    from biaslens.testing import tiny_model

    return tiny_model({"neox": "neox"}.get(arch, arch), folder, n_layers=3, seed=seed,
                      tokenizer=gpt2_tokenizer())


ARCHS = ("gpt2", "neox", "opt", "llama")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One small random model folder per architecture, with the real GPT-2 tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: _build(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def organism():
    import biaslens

    return biaslens.load("organism")


@pytest.fixture(scope="module")
def one_thread():
    """Small models run faster on one thread on a shared machine; restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
