"""ppolm's GRPO against TRL's ``GRPOTrainer(tools=...)`` on the calculator task of
``examples/tools_smollm2.py``, in one run.

    python benchmarks/vs_trl_tools.py                  # 16 generations x 16 episodes each
    python benchmarks/vs_trl_tools.py --quick          # 2 generations, 16 held-out questions

The task: SmolLM2-135M-Instruct answers "What is A * B?" (A, B in 10..99) with a multiply tool,
called by one line ``CALC: A*B`` that the system prompt teaches and one example exchange in every
prompt shows (the 135M model does not write the template's ``<tool_call>`` JSON); the tool
answers "A * B = C"; the reward is 1 when the model's last turn answers the product
(``product_reward`` of the example). Both sides: top 10 of 30 decoder layers trained, 4 samples
per prompt, 16 episodes per generation, updates on minibatches of 8 (one epoch), temperature 1.0
(no top-k, no top-p), AdamW lr 1e-4 (epsilon 1e-5, 4 warm-up steps, then constant), gradient
norm clipped to 1, clip 0.2, the group advantage on every model token, TRL's
``loss_type="grpo"`` aggregation, the k3 KL to the base model in the loss with coefficient 0.02,
dropout off, at most one tool call (ppolm: 2 model turns; TRL: ``max_tool_calling_iterations=1``).

The budgets differ in form: ppolm gives each model turn 14 new tokens; TRL's
``max_completion_length`` counts the whole completion (model turns and the tool's message), set
here to 2 x 14 + 22 (the tool's message with its template tokens, for a 4-digit product), so a
TRL first turn may run longer than 14 tokens and leave less to the answer.

TRL's side needs what TRL's tool loop asks of a template and a parser: SmolLM2's chat template
with assistant ``tool_calls`` rendered as the ``CALC:`` line (TRL checks that a template renders
tool calls and tool messages), and a transformers response template that reads ``CALC: A*B`` as
a ``multiply`` call (``tokenizer.response_template``). The prompts render to the same text as
ppolm's (checked).

Each side runs in a fresh process, one after the other, with the same torch threads. Both
trained models are evaluated by the same function: ``ppolm.evaluate`` with ppolm's tool loop,
one episode per held-out question at temperature 1.0, sampling seed 1234, and the KL to the base
model. Printed: held-out success, tool use and KL, training wall time (the ``train()`` call
alone), seconds per episode, peak resident memory; last a line ``speedup=X.XX`` (TRL's training
seconds over ppolm's). TRL 1.16 lives in its own environment (see benchmarks/vs_trl_grpo.py):

    python -m venv --system-site-packages .venv-trl
    .venv-trl/bin/pip install trl==1.16.0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vs_trl_grpo import (  # this folder, first on the path of a script run from it
    compare,
    run_side,
    trl_python,
)

ROOT = Path(__file__).resolve().parents[1]
TRAINABLE_LAYERS = 10
SAMPLES_PER_PROMPT = 4
BATCH = 16          # episodes per generation
MINIBATCH = 8       # episodes per optimizer step
MAX_NEW_TOKENS = 14  # per model turn
MAX_TURNS = 2
TOOL_MESSAGE_TOKENS = 22   # the tool's message with its template tokens, 4-digit product
LEARNING_RATE = 1e-4
WARMUP_STEPS = 4
KL_COEF = 0.02

# SmolLM2's template, with an assistant message's tool calls rendered as the CALC line.
CALC_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
    "helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] %}"
    "{% if f['name'] == 'multiply' and f['arguments'] is mapping and 'a' in f['arguments'] %}"
    "{{ 'CALC: ' + f['arguments']['a'] | string + '*' + f['arguments']['b'] | string }}"
    "{% else %}{{ f['name'] + ' ' + f['arguments'] | tojson }}{% endif %}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# transformers' response template: "CALC: A*B" is a multiply call (the rest of its line dropped).
CALC_RESPONSE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {
            "open_pattern": r"CALC:\s*(?P<a>\d+)\s*[*x×]\s*(?P<b>\d+)",
            "close_pattern": r"[^\n<]*(?:\n|<\|im_end\|>)",
            "repeats": True,
            "content": "text",
            "transform": {"type": "function",
                          "function": {"name": "multiply", "arguments": {"a": "{a}", "b": "{b}"}}},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def demo() -> Any:
    """examples/tools_smollm2.py as a module (the task's prompts, tool, parser and reward)."""
    spec = importlib.util.spec_from_file_location("tools_smollm2", ROOT / "examples" /
                                                  "tools_smollm2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 generations and 16 held-out questions (a check)")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"generations of {BATCH} episodes (default 16; --quick: 2)")
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out questions (default 32; --quick: 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-python", default=None,
                   help="the interpreter of an environment with trl 1.16 (see the docstring)")
    p.add_argument("--sides", default="ppolm,trl", help="comma-separated: ppolm, trl")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--side", choices=("ppolm", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.iterations = args.iterations or (2 if args.quick else 16)
    args.eval_prompts = args.eval_prompts or (16 if args.quick else 32)
    return args


# --- both sides ------------------------------------------------------------------------------
def setup(threads: int, seed: int) -> tuple[Any, Any, Any]:
    """The policy (top layers trainable), its tokenizer and the task's module."""
    import torch

    from ppolm.policies.pretrained import freeze_lower_layers, load_smollm2

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    policy, tokenizer = load_smollm2()
    freeze_lower_layers(policy, TRAINABLE_LAYERS)
    return policy, tokenizer, demo()


def held_out(policy: Any, tokenizer: Any, task: Any, n: int, name: str) -> dict[str, Any]:
    """One episode per held-out question (seed 1234) with ppolm's tool loop, on the plain
    engine, and the KL to the base model."""
    from ppolm import ToolInteraction, evaluate
    from ppolm.policies.pretrained import load_smollm2

    reference = load_smollm2()[0].requires_grad_(False)
    prompts = [task.render(tokenizer, q, True) for q in task.questions("eval", n)]
    r = evaluate(policy, tokenizer, prompts, task.product_reward, reference,
                 max_new_tokens=MAX_NEW_TOKENS, add_special_tokens=False, seed=1234,
                 interaction=ToolInteraction(tools=[task.multiply], parser=task.parse_calc),
                 max_turns=MAX_TURNS)
    use = sum(task.used_tool(s.response) for s in r.samples) / r.n
    print(f"[{name}] held out: success {r.reward_mean:.1%} ± {r.reward_se:.1%}, tool used in "
          f"{use:.0%}, KL {r.kl:.2f} ({r.n} questions)", flush=True)
    return {"success": r.reward_mean, "success_se": r.reward_se, "tool_use": use, "kl": r.kl,
            "n": r.n, "transcripts": [s.response for s in r.samples[:3]]}


def run_ppolm(args: argparse.Namespace) -> dict[str, Any]:
    import ppolm
    from ppolm import PPOConfig, TextGenerationEnv, ToolInteraction, Trainer

    policy, tokenizer, task = setup(args.threads, args.seed)
    before = held_out(policy, tokenizer, task, args.eval_prompts, "base model")
    env = TextGenerationEnv([task.render(tokenizer, q, True) for q in task.questions("train")],
                            tokenizer, task.product_reward, max_new_tokens=MAX_NEW_TOKENS,
                            add_special_tokens=False, seed=args.seed, max_turns=MAX_TURNS,
                            interaction=ToolInteraction(tools=[task.multiply],
                                                        parser=task.parse_calc))
    out = tempfile.mkdtemp(prefix="vs_trl_tools_")
    config = PPOConfig(
        iterations=args.iterations, batch_size=BATCH, minibatch_size=MINIBATCH, ppo_epochs=1,
        learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, seed=args.seed, device="cpu",
        samples_per_prompt=SAMPLES_PER_PROMPT, advantage_estimator="grpo",
        kl_mode="loss", kl_estimator="k3", kl_coef=KL_COEF, keep_freed_memory=True,
        output_dir=out, overwrite=True, progress=False)
    trainer = Trainer(policy, env, config)
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after = held_out(policy, tokenizer, task, args.eval_prompts, "ppolm")
    return {"name": f"ppolm {ppolm.__version__} (grpo, {trainer.engine.name} engine)",
            "train_seconds": seconds, "episodes": len(history) * BATCH,
            "train_scores": [h["score_mean"] for h in history],
            "before": before, "after": after}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy, tokenizer, task = setup(args.threads, args.seed)
    model = policy.lm
    questions = task.questions("train")
    messages = [[{"role": "system", "content": task.SYSTEM}, *task.EXAMPLE,
                 {"role": "user", "content": q}] for q in questions]
    original = tokenizer.chat_template
    tokenizer.chat_template = CALC_TEMPLATE
    tokenizer.response_template = CALC_RESPONSE
    for m, q in zip(messages[:8], questions[:8], strict=True):   # the same prompt text
        assert (tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                == task.render(tokenizer, q, True)), "the prompts differ from ppolm's"
    dataset = Dataset.from_dict({"prompt": messages})
    # TRL loads its reference model from the model's name; load_smollm2 names it by its Hub
    # id, which this machine may not reach: the base weights from a local folder instead.
    base = tempfile.mkdtemp(prefix="vs_trl_tools_base_")
    model.save_pretrained(base)
    model.config._name_or_path = base

    def reward_fn(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        turns = [[m["content"] or "" for m in c if m["role"] == "assistant"] or [""]
                 for c in completions]
        return task.product_reward([p[-1]["content"] for p in prompts], [""] * len(turns),
                                   turns)

    out = tempfile.mkdtemp(prefix="vs_trl_tools_trl_")
    config = GRPOConfig(
        output_dir=out, max_steps=args.iterations * (BATCH // MINIBATCH),
        per_device_train_batch_size=MINIBATCH, gradient_accumulation_steps=1,
        generation_batch_size=BATCH, num_generations=SAMPLES_PER_PROMPT, num_iterations=1,
        max_completion_length=MAX_TURNS * MAX_NEW_TOKENS + TOOL_MESSAGE_TOKENS,
        max_tool_calling_iterations=MAX_TURNS - 1,
        temperature=1.0, top_k=0, top_p=1.0,
        learning_rate=LEARNING_RATE, adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0,
        epsilon=0.2, beta=KL_COEF, loss_type="grpo", scale_rewards="group",
        disable_dropout=True, gradient_checkpointing=False, use_cpu=True, bf16=False,
        fp16=False, seed=args.seed,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    # ppolm's optimizer and warm-up (lr x 1/4, 2/4, 3/4, then 1 from the first step).
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, eps=1e-5, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          tools=[task.multiply], optimizers=(optimizer, schedule))
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    scores = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    policy.lm.eval()
    tokenizer.chat_template = original
    after = held_out(policy, tokenizer, task, args.eval_prompts, "TRL")
    return {"name": f"TRL {trl.__version__} GRPOTrainer(tools=)", "train_seconds": seconds,
            "episodes": trainer.state.global_step * MINIBATCH, "train_scores": scores,
            "after": after}


def side_main(args: argparse.Namespace) -> None:
    result = run_ppolm(args) if args.side == "ppolm" else run_trl(args)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


# --- the parent --------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.side:
        side_main(args)
        return
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {s: run_side(s, sys.executable if s == "ppolm" else trl_python(args.trl_python),
                           args, script=__file__) for s in sides}
    print(f"\nSmolLM2-135M-Instruct, a multiply tool (A * B, A, B in 10..99), {args.iterations} "
          f"generations x {BATCH} episodes ({SAMPLES_PER_PROMPT} per prompt), "
          f"{args.threads} threads")
    if "ppolm" in results:
        b = results["ppolm"]["before"]
        print(f"base model, held out: {b['success']:.1%} ± {b['success_se']:.1%}, tool used in "
              f"{b['tool_use']:.0%} ({b['n']} questions)")
    print("| side | episodes | held-out success | tool used | KL | train s | s/episode | "
          "peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        a = r["after"]
        print(f"| {r['name']} | {r['episodes']} | {a['success']:.1%} ± {a['success_se']:.1%} | "
              f"{a['tool_use']:.0%} | {a['kl']:.2f} | {r['train_seconds']:.1f} | "
              f"{r['train_seconds'] / r['episodes']:.3f} | {r['peak_rss_mib']:.0f} |")
    compare(results, args)


if __name__ == "__main__":
    main()
