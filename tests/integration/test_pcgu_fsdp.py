"""Distributed PCGU: 2 CPU processes under torchrun (gloo, FSDP2) select the same units and end
with the same weights as one process, while each process builds the model on meta and reads and
holds only its rows; plus the pieces (row split, meta skeleton, checkpoint slices, streamed
safetensors, the BiasModel API) in this process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import biaslens
from biaslens.errors import BiasLensError, ModelLoadError
from biaslens.unlearn import organism_pairs, pcgu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_pcgu import word_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARGS = dict(k=300, lr=0.1, batch_size=15, max_steps=3)


def papers_pcgu(model, pairs, **kw):
    """Single-process PCGU with the update the FSDP engine runs (the papers' update over every
    1-D and 2-D parameter, sentence form, one epoch): no strength selection and no keep term,
    which run in one process only."""
    import inspect

    extra = {k: v for k, v in (("validation", None), ("keep_weight", 0.0))
             if k in inspect.signature(pcgu).parameters}
    return pcgu(model, pairs, **{"params": None, "form": "sentence", "epochs": 1, "progress": False,
                                 **extra, **kw})


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return word_model(tmp_path_factory.mktemp("pcgu_fsdp") / "gpt2", "gpt2")


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory) -> Path:
    return word_model(tmp_path_factory.mktemp("pcgu_fsdp") / "neox", "neox")


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is much faster on one thread on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tmp_path_factory):
    """One torchrun of 2 processes (delta and export) and the same PCGU in this process."""
    import torch

    out = tmp_path_factory.mktemp("pcgu_fsdp_run")
    args = ["--model", str(tiny_gpt2), "--pairs", "organism", "--k", str(ARGS["k"]), "--lr", str(ARGS["lr"]),
            "--batch-size", str(ARGS["batch_size"]), "--max-steps", str(ARGS["max_steps"]), "--form", "sentence"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "biaslens.unlearn.distributed", *args, "--delta", str(out / "fsdp"), "--out", str(out / "export")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = biaslens.load(tiny_gpt2)
        single = papers_pcgu(model, organism_pairs(), **ARGS)
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "model": model, "single": single,
            "manifest": json.loads((out / "fsdp" / "history.json").read_text())}


def test_fsdp_matches_single_process(runs):
    """torchrun with 2 CPU processes (gloo, FSDP2): the same units every step and the same weights."""
    from safetensors.torch import load_file

    dist_delta = load_file(str(runs["out"] / "fsdp" / "delta.safetensors"))
    manifest, single = runs["manifest"], runs["single"]
    assert manifest["world_size"] == 2 and manifest["method"] == "pcgu-fsdp"
    assert [h["units_sha1"] for h in manifest["history"]] == [h["units_sha1"] for h in single.info["history"]]
    assert sorted(dist_delta) == single.names
    for n, t in single.tensors().items():
        assert (dist_delta[n] - t).abs().max() < 1e-6, n
    stats = {s["name"]: s for s in single.stats()}
    for s in manifest["changed_tensors"]:  # reduced over the shards, the same numbers
        assert s["changed_entries"] == stats[s["name"]]["changed_entries"]
        assert math.isclose(s["l2"], stats[s["name"]]["l2"], rel_tol=1e-4)


def test_export_holds_the_single_process_weights(runs):
    """``--out``: rank 0 receives the updated tensors one at a time; the exported folder holds the
    weights one process ends with."""
    from safetensors.torch import load_file

    folder = runs["out"] / "export"
    saved = load_file(str(folder / "model.safetensors"))
    model = runs["model"]
    for n, p in model.params.items():
        assert (saved[n] - p.detach()).abs().max() < 1e-6, n
    man = json.loads((folder / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["method"] == "pcgu-fsdp"
    assert man["verification"]["tensors_bit_exact"] is True


def test_no_rank_reads_or_holds_the_whole_model(runs):
    """Each process held about half of the parameters, read from the checkpoint exactly the rows it
    holds (the loader records every read) and never a whole multi-row tensor."""
    model = runs["model"]
    total = sum(p.numel() for p in model.params.values())
    ranks = runs["manifest"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["local_params"] for r in ranks) == total
    for r in ranks:
        assert r["params"] == total
        assert abs(r["local_params"] - total / 2) <= len(model.params)  # at most one row per tensor off
        assert r["read_elements"] == r["local_params"]  # the loader read its rows and nothing else
        assert r["whole_tensors_read"] == 0
        assert r["reads"] == len(model.params)


# ----------------------------------------------------------------------------- the pieces, in-process


def test_shard_rows_follow_torch_chunk():
    import torch

    from biaslens.unlearn.distributed import shard_rows

    for n in (1, 2, 3, 7, 64, 1001):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(n).chunk(world)
            for rank in range(world):
                a, b = shard_rows(n, world, rank)
                want = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(a, b)) == want, (n, world, rank)


def test_skeleton_has_no_parameter_storage_and_real_buffers(tiny_neox):
    """Parameters on meta (tied ones one Parameter), buffers (rotary frequencies) computed as
    ``from_pretrained`` computes them."""
    import torch
    from transformers import AutoConfig

    from biaslens.unlearn.distributed import _skeleton

    sk = _skeleton(AutoConfig.from_pretrained(tiny_neox), torch.float32)
    assert all(p.is_meta for p in sk.parameters())
    buffers = dict(sk.named_buffers())
    assert buffers and not any(b.is_meta for b in buffers.values())
    loaded = biaslens.load(tiny_neox)
    for n, b in loaded.buffers.items():
        assert torch.equal(buffers[n], b), n


def test_checkpoint_rows_reads_only_the_slice(tiny_neox):
    """Checkpoint keys are renamed as ``from_pretrained`` renames them (GPT-NeoX's stored
    ``embed_out`` is the module's ``lm_head``); a read returns the rows asked for and is recorded."""
    import torch
    from transformers import AutoConfig

    from biaslens.unlearn.distributed import _CheckpointRows, _match_keys, _skeleton

    sk = _skeleton(AutoConfig.from_pretrained(tiny_neox), torch.float32)
    src = _CheckpointRows(tiny_neox, "neox")
    keys = _match_keys(sk, src, "neox")
    assert set(keys) == {n for n, _ in sk.named_parameters()}
    assert keys["lm_head.weight"] == "embed_out.weight"
    full = biaslens.load(tiny_neox).params
    name = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
    rows = src.rows(keys[name], 5, 17)
    assert torch.equal(rows, full[name].detach()[5:17])
    assert src.reads == [(name, 5, 17, full[name].shape[0])]


def test_checkpoint_refusals(tiny_gpt2, tmp_path):
    """No safetensors file, or a tensor whose shape differs from the config: a clear error."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from biaslens.unlearn.distributed import _CheckpointRows, _match_keys, _skeleton

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_gpt2 / "config.json", empty / "config.json")
    with pytest.raises(ModelLoadError, match="safetensors"):
        _CheckpointRows(empty, "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(tiny_gpt2 / "config.json", bad / "config.json")
    state = load_file(str(tiny_gpt2 / "model.safetensors"))
    state["transformer.h.0.ln_1.weight"] = torch.ones(7)
    save_file(state, str(bad / "model.safetensors"))
    sk = _skeleton(AutoConfig.from_pretrained(bad), torch.float32)
    with pytest.raises(ModelLoadError, match="shape differs.*ln_1"):
        _match_keys(sk, _CheckpointRows(bad, "bad"), "bad")


def test_streamed_safetensors_read_back(tmp_path):
    """The header is written first from the shapes, the tensors one at a time after it."""
    import torch
    from safetensors import safe_open

    from biaslens.unlearn.distributed import _stream_safetensors

    ts = {"a": torch.randn(3, 5), "b.weight": torch.randn(7), "c": torch.randn(2, 2, 2).to(torch.bfloat16)}
    path = tmp_path / "d.safetensors"
    _stream_safetensors(path, [(n, t.shape, t.dtype) for n, t in ts.items()], {"method": "m"}, iter(ts.values()))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"method": "m"}
        for n, t in ts.items():
            assert torch.equal(f.get_tensor(n), t)
    with pytest.raises(RuntimeError, match="did not arrive"):
        _stream_safetensors(tmp_path / "e.safetensors", [("a", (3, 5), torch.float32)], {}, iter([torch.zeros(2)]))


def test_needs_a_process_group(tiny_gpt2):
    from biaslens.unlearn.distributed import load_sharded, pcgu_fsdp

    with pytest.raises(BiasLensError, match="process group"):
        load_sharded(tiny_gpt2)
    with pytest.raises(BiasLensError, match="torchrun"):
        pcgu_fsdp(biaslens.load(tiny_gpt2), organism_pairs()[:4])


def test_biasmodel_and_sharded_api_in_one_process(tiny_neox, tmp_path, one_thread):
    """A one-process gloo group: ``pcgu_fsdp`` on a loaded BiasModel gives the whole delta and
    updates the model; on a ``load_sharded`` model it gives a ShardedDelta whose streamed file is
    the same delta. Both match single-process PCGU (GPT-NeoX: renamed keys, rotary buffers)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from biaslens.unlearn.distributed import ShardedDelta, load_sharded, pcgu_fsdp

    pairs = organism_pairs()[:20]
    kw = dict(k=200, lr=0.1, batch_size=10, max_steps=2, progress=False)
    ref_model = biaslens.load(tiny_neox)
    ref = papers_pcgu(ref_model, pairs, **kw)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = biaslens.load(tiny_neox)
        whole = pcgu_fsdp(model, pairs, **kw)
        sharded = pcgu_fsdp(load_sharded(tiny_neox), pairs, **kw)
        assert isinstance(sharded, ShardedDelta)
        sharded.save(tmp_path / "delta.safetensors")
        gathered = sharded.gather(ref.names[0], "updated")
    finally:
        dist.destroy_process_group()
    assert whole.names == ref.names == sharded.names
    for n in ref.names:
        assert (whole.diff(n) - ref.diff(n)).abs().max() < 1e-6, n
        assert (model.params[n].detach() - ref_model.params[n].detach()).abs().max() < 1e-6, n
    saved = load_file(str(tmp_path / "delta.safetensors"))
    for n, t in ref.tensors().items():
        assert (saved[n] - t).abs().max() < 1e-6, n
    assert (gathered - ref_model.params[ref.names[0]].detach()).abs().max() < 1e-6
    assert [h["units_sha1"] for h in sharded.info["history"]] == [h["units_sha1"] for h in ref.info["history"]]
