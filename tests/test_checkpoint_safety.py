"""Checkpoints that cannot run code: every file ppolm reads back from a checkpoint or a model
folder (the trainer state, each rank's generators, a TorchPolicy's weights, an earlier
version's value head, DCP's metadata and its non-tensor values) is unpickled by a restricted
unpickler. A crafted file whose unpickling would call a function (here ``os.mkdir``, leaving a
folder behind as evidence) is refused with a CheckpointError, and the function never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import toy_trainer
from ppolm.checkpoint.export import load_value_head
from ppolm.checkpoint.folders import STATE_FILE, latest_checkpoint
from ppolm.checkpoint.sharded import METADATA_FILE, MODELS, load_shards
from ppolm.errors import CheckpointError
from ppolm.policies.transformer import TransformerPolicy


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: code a checkpoint file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_the_payload_runs_code_when_unpickled_without_restrictions(tmp_path):
    """(So that the refusals below can fail: a plain unpickling of the crafted file runs it.)"""
    torch.save({"state": Payload(tmp_path / "ran")}, tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert (tmp_path / "ran").is_dir()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-process run's checkpoint (a TorchPolicy: its weights in policy/policy.pt)."""
    out = tmp_path_factory.mktemp("run")
    toy_trainer(out, iterations=1, save_every=1).train()
    found = latest_checkpoint(out / "checkpoints")
    assert found is not None
    return out, found


@pytest.mark.parametrize("file", [STATE_FILE, "rng-rank-0.pt", "policy/policy.pt"])
def test_a_crafted_file_in_a_checkpoint_is_refused_and_runs_nothing(checkpoint, tmp_path, file):
    out, folder = checkpoint
    original = (folder / file).read_bytes()
    marker = tmp_path / "ran"
    torch.save({"format": 2, "state_dict": Payload(marker)}, folder / file)
    try:
        with pytest.raises(CheckpointError, match="corrupt|Cannot read"):
            toy_trainer(out, iterations=1).resume()
        if file.startswith("policy/"):
            with pytest.raises(CheckpointError, match="corrupt"):
                TransformerPolicy.from_saved(folder / "policy")
    finally:
        (folder / file).write_bytes(original)
    assert not marker.exists()
    toy_trainer(out, iterations=1).resume()          # (the genuine files load)


def test_a_crafted_value_head_pt_is_refused_and_runs_nothing(tmp_path):
    torch.save({"linear.weight": Payload(tmp_path / "ran")}, tmp_path / "value_head.pt")
    with pytest.raises(CheckpointError, match="Cannot read the value head"):
        load_value_head(tmp_path)
    assert not (tmp_path / "ran").exists()


def dcp_checkpoint(folder: Path, extra: object = 0.5) -> dict:
    """A DCP checkpoint of the sharded layout (``models/``) written by one process: a tensor
    and a non-tensor value (``extra``); returns a template to load it into."""
    state = {"models": {"w": torch.arange(4.0)}, "optimizer": {"param_groups": extra}}
    dcp.save(state, checkpoint_id=str(folder / MODELS), no_dist=True)
    return {"models": {"w": torch.zeros(4)}, "optimizer": {"param_groups": 0.0}}


def test_dcp_shards_load_when_genuine(tmp_path):
    template = dcp_checkpoint(tmp_path)
    got = load_shards(template, tmp_path)
    assert torch.equal(got["models"]["w"], torch.arange(4.0))
    assert got["optimizer"]["param_groups"] == 0.5


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(tmp_path):
    template = dcp_checkpoint(tmp_path)
    with (tmp_path / MODELS / METADATA_FILE).open("wb") as f:
        pickle.dump(Payload(tmp_path / "ran"), f)
    with pytest.raises(CheckpointError, match="corrupt or unsafe"):
        load_shards(template, tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_crafted_non_tensor_value_in_dcp_shards_is_refused_and_runs_nothing(tmp_path):
    """DCP unpickles non-tensor values (AdamW's param_groups) with weights_only=False."""
    template = dcp_checkpoint(tmp_path, extra=Payload(tmp_path / "ran"))
    assert not (tmp_path / "ran").exists()
    with pytest.raises(CheckpointError, match="unsafe"):
        load_shards(template, tmp_path)
    assert not (tmp_path / "ran").exists()
