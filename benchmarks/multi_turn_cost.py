"""What a multi-turn episode costs on SmolLM2-135M-Instruct: 1, 2 and 4 model turns.

    python benchmarks/multi_turn_cost.py [--episodes 8] [--new-tokens 24] [--repeats 3]

Each episode is a chat prompt, then model turns of exactly ``--new-tokens`` tokens each
(``ignore_eos``), each answered by a tool message of about 20 tokens, as a calculator's
would be. Sampling keeps what the trainer keeps (``record=True``). Printed per number of
turns: the token positions run through the model per episode (counted by a forward pre-hook on
the transformers model: a figure the machine's load does not change), and the seconds per
episode (the fastest of ``--repeats`` passes, after one warm-up pass). Without a cache across
turns each turn runs the whole conversation again, so the positions grow with the square of
the turns; with it, each turn runs its own tokens (the reply, and the model's turn one token a
step).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ppolm import Interaction, Reply, TextGenerationEnv, load_smollm2


class Calculator(Interaction):
    """A tool message after every model turn (the episode ends at max_turns)."""

    reply_role = "tool"

    def reply(self, prompt: str, turns: list[str], state: dict[str, Any]) -> Reply:
        return Reply(f'{{"result": {123 * len(turns)}, "unit": "apples", "turn": {len(turns)}}}')


def measure(policy: Any, tok: Any, turns: int, episodes: int, new_tokens: int,
            repeats: int) -> tuple[float, float]:
    """(positions run per episode, seconds per episode) for episodes of ``turns`` turns."""
    env = TextGenerationEnv(
        [[{"role": "user", "content": "Use the calculator to add up the apples, step by "
                                      "step, and tell me the total."}]],
        tok, lambda p, r: [0.0] * len(r), max_new_tokens=new_tokens, ignore_eos=True,
        interaction=Calculator(), max_turns=turns)
    seen = [0]

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen[0] += int(kwargs["input_ids"].numel())

    hook = policy.lm.base_model.register_forward_pre_hook(count, with_kwargs=True)
    times = []
    try:
        for r in range(repeats + 1):
            seen[0] = 0
            t0 = time.perf_counter()
            ep = env.sample(policy, episodes, 1.0, torch.device("cpu"),
                            torch.Generator().manual_seed(r), indices=[0] * episodes,
                            record=True)
            times.append(time.perf_counter() - t0)
            assert ep.turn_info is not None
            assert ep.turn_info.num_turns.tolist() == [turns] * episodes
    finally:
        hook.remove()
    return seen[0] / episodes, min(times[1:]) / episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    policy, tok = load_smollm2()
    policy.eval()
    print(f"SmolLM2-135M-Instruct, {args.episodes} episodes a batch, {args.new_tokens} tokens a "
          f"model turn, {args.threads} threads")
    print(f"{'turns':>5} {'positions/episode':>18} {'s/episode':>10} {'s/model token':>14}")
    for turns in (1, 2, 4):
        positions, seconds = measure(policy, tok, turns, args.episodes, args.new_tokens,
                                     args.repeats)
        print(f"{turns:>5} {positions:>18.0f} {seconds:>10.3f} "
              f"{seconds / (turns * args.new_tokens):>14.4f}")


if __name__ == "__main__":
    main()
