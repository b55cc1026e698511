"""Models by name: a Hub id resolves to its snapshot in the local Hugging Face cache (a
temporary cache in the documented layout, built here: nothing is downloaded), from Python and
from the YAML spec; an id that is not cached is a clear ConfigError."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from ppolm import HFPolicy
from ppolm.errors import ConfigError
from ppolm.policies.pretrained import load_tokenizer

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tok):
    """HF_HUB_CACHE with one model, laid out as huggingface_hub writes it:
    models--{org}--{name}/refs/main holds the commit, snapshots/{commit}/ the files."""
    cache = tmp_path / "hub"
    entry = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = entry / "snapshots" / COMMIT
    torch.manual_seed(0)
    model = tiny_llama(len(tok))
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model


def test_a_cached_hub_id_loads_policy_and_tokenizer(hub_cache, tok):
    policy = HFPolicy(REPO)
    assert all(torch.equal(a, b) for a, b in zip(policy.lm.state_dict().values(),
                                                 hub_cache.state_dict().values(), strict=True))
    assert load_tokenizer(REPO)("abc")["input_ids"] == tok("abc")["input_ids"]


def test_the_yaml_spec_takes_a_hub_id(hub_cache):
    from ppolm.run import RunSpec, build_run

    spec = RunSpec.from_dict({"model": {"kind": "hf", "path": REPO, "lora": {"r": 2}},
                              "task": "continue", "ppo": {"engine": "plain",
                                                          "progress": False}})
    assert build_run(spec).policy.is_lora


def test_an_uncached_hub_id_is_a_config_error(hub_cache):
    with pytest.raises(ConfigError, match="neither a local folder nor a model in the Hugging "
                                          "Face cache.*hf download other/model"):
        HFPolicy("other/model")
    with pytest.raises(ConfigError, match="neither a local folder"):
        load_tokenizer("other/model")
