"""A calculator tool on SmolLM2-135M-Instruct: products of two 2-digit numbers, which the model
cannot work out in its head, learned with PPO (``--estimator gae``, a value head) or GRPO.

The 135M model does not write the chat template's ``<tool_call>{...}</tool_call>`` JSON on its
own, and with one example exchange in the prompt it still mostly multiplies in its head. So
the system prompt teaches a plainer call, one line ``CALC: 23*47``, every prompt shows one
example exchange with it, and ``ToolInteraction(parser=parse_calc)`` reads it. The reward is 1
when the model's last turn answers the right product (read as ``ArithmeticReward`` reads an
answer), 0 otherwise: it pays for the answer, not for calling the tool.

Printed: held-out success without the tool (the base model, plain question), then held-out
success and the share of episodes that called the tool before and after training, the KL to
the base model and the training time; written to ``runs/tools_smollm2/ESTIMATOR/summary.json``
with a few transcripts:

    python examples/tools_smollm2.py --estimator gae       # PPO with a value head
    python examples/tools_smollm2.py --estimator grpo

A smoke run: ``--iterations 2 --batch-size 8 --eval-prompts 8``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch

from ppolm import (
    PPOConfig,
    TextGenerationEnv,
    ToolInteraction,
    Trainer,
    ValueHead,
    evaluate,
)
from ppolm.policies.pretrained import freeze_lower_layers, load_smollm2
from ppolm.rollout.tools import MalformedCall, ToolCall

SYSTEM = ("You are an assistant with a calculator. You cannot multiply in your head. To "
          "multiply, reply with one line: CALC: A*B (for example CALC: 12*34). The calculator "
          "replies with the result. Then give the result as your answer.")
EXAMPLE = [
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": "CALC: 12*34"},
    {"role": "tool", "content": "12 * 34 = 408"},
    {"role": "assistant", "content": "12 * 34 = 408"},
]
CALL = re.compile(r"CALC:([^\n]*)")
PRODUCT = re.compile(r"\s*(\d+)\s*[*x×]\s*(\d+)")
QUESTION = re.compile(r"What is (\d+) \* (\d+)\?")
NUMBER = re.compile(r"-?\d[\d,]*")


def multiply(a: int, b: int) -> str:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    # "A * B = C" rather than C alone: the base model copies it as its answer far more often.
    return f"{a} * {b} = {int(a) * int(b)}"


def parse_calc(text: str) -> list[ToolCall]:
    """The calls in a model turn: each ``CALC: A*B`` is ``multiply(a=A, b=B)`` (what follows
    the product on the line is ignored)."""
    calls = []
    for body in CALL.findall(text):
        found = PRODUCT.match(body)
        if not found:
            raise MalformedCall(f"expected CALC: A*B with two integers, got {body.strip()!r}")
        calls.append(ToolCall("multiply", {"a": int(found[1]), "b": int(found[2])}))
    return calls


def questions(split: str, n: int = 1000) -> list[str]:
    """'What is A * B?' with A, B in 10..99; 'train' and 'eval' are disjoint halves of a fixed
    shuffle of the pairs."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(0).shuffle(pairs)
    half = pairs[: len(pairs) // 2] if split == "train" else pairs[len(pairs) // 2:]
    return [f"What is {a} * {b}?" for a, b in half[:n]]


def render(tokenizer: Any, question: str, tool: bool) -> str:
    """The chat prompt: with the tool, the system prompt and the example exchange first."""
    head = [{"role": "system", "content": SYSTEM}, *EXAMPLE] if tool else []
    return tokenizer.apply_chat_template(head + [{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)


def answer(text: str) -> int | None:
    """The answer in a model turn, as ``ArithmeticReward`` reads it: the first integer after
    the first '=' when there is one ("12 * 34 = 408"), else the first integer."""
    found = NUMBER.search(text, text.index("=") + 1 if "=" in text else 0)
    return int(found.group(0).replace(",", "")) if found else None


def product_reward(prompts: list[str], responses: list[str],
                   turns: list[list[str]] | None = None) -> list[float]:
    """1.0 when the model's last turn answers the product the prompt's last question asks
    for, else 0.0. Without an interaction the response is the one turn."""
    out = []
    for prompt, said in zip(prompts, turns or [[r] for r in responses], strict=True):
        a, b = QUESTION.findall(prompt)[-1]
        out.append(float(answer(said[-1]) == int(a) * int(b)))
    return out


def used_tool(response: str) -> bool:
    """Whether an episode's transcript holds a call (a well-formed one or not)."""
    return bool(CALL.search(response))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimator", choices=("gae", "grpo"), default="grpo")
    p.add_argument("--iterations", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="episodes per iteration")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="GRPO's group size")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--kl-coef", type=float, default=0.02)
    p.add_argument("--trainable-layers", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=14, help="per model turn")
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default runs/tools_smollm2/ESTIMATOR")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out or f"runs/tools_smollm2/{args.estimator}")
    out.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = load_smollm2()
    reference = load_smollm2()[0].requires_grad_(False)
    freeze_lower_layers(policy, args.trainable_layers)
    tools = ToolInteraction(tools=[multiply], parser=parse_calc)
    held_out = questions("eval", args.eval_prompts)
    env = TextGenerationEnv([render(tokenizer, q, True) for q in questions("train")], tokenizer,
                            product_reward, max_new_tokens=args.max_new_tokens,
                            add_special_tokens=False, seed=args.seed, interaction=tools,
                            max_turns=args.max_turns)
    gae = args.estimator == "gae"
    kl = {} if gae else {"kl_mode": "loss", "kl_estimator": "k3"}
    config = PPOConfig(iterations=args.iterations, batch_size=args.batch_size, minibatch_size=8,
                       ppo_epochs=1, learning_rate=args.learning_rate, warmup_steps=4,
                       samples_per_prompt=1 if gae else args.samples_per_prompt,
                       advantage_estimator=args.estimator, kl_coef=args.kl_coef, **kl,
                       seed=args.seed, device="cpu", keep_freed_memory=True,
                       output_dir=str(out / "run"), overwrite=True)
    value_head = ValueHead(policy.hidden_size, detach=True) if gae else None
    trainer = Trainer(policy, env, config, value_head=value_head, reference=reference)

    def held_out_success(name: str, tool: bool = True) -> dict[str, Any]:
        result = evaluate(policy, tokenizer, [render(tokenizer, q, tool) for q in held_out],
                          product_reward, reference, max_new_tokens=args.max_new_tokens,
                          add_special_tokens=False, seed=1234, engine=trainer.engine,
                          interaction=tools if tool else None, max_turns=args.max_turns,
                          out=out / f"eval_{name}.json")
        calls = sum(used_tool(s.response) for s in result.samples) / result.n
        print(f"{name}: success {result.reward_mean:.1%} ± {result.reward_se:.1%}, tool used "
              f"in {calls:.0%} of episodes, KL {result.kl:.2f} ({result.n} held-out "
              "questions)", flush=True)
        figures = {k: v for k, v in result.to_dict().items() if k != "samples"}
        return {**figures, "tool_use": calls,
                "transcripts": [{"question": q, "transcript": s.response, "reward": s.reward}
                                for q, s in zip(held_out, result.samples[:4], strict=False)]}

    without = held_out_success("without_tool", tool=False)
    before = held_out_success("before")
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after = held_out_success("after")
    summary = {
        "estimator": args.estimator, "episodes": args.iterations * args.batch_size,
        "train_seconds": seconds,
        "peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "without_tool": without, "before": before, "after": after, "args": vars(args),
        "config": config.to_sections(), "history": history,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for t in after["transcripts"][:2]:
        print(f"--- {t['question']} (reward {t['reward']:.0f})\n{t['transcript']}")
    print(f"| {args.estimator} | {without['reward_mean']:.1%} | {before['reward_mean']:.1%} "
          f"({before['tool_use']:.0%} tool) | {after['reward_mean']:.1%} "
          f"({after['tool_use']:.0%} tool) | {after['kl']:.2f} | {seconds / 60:.1f} min |")


if __name__ == "__main__":
    main()
