"""The two sides of the comparison, each run in its own worker process.

A worker builds one side (ppolm with a separate critic, ppolm with the value head on the shared
trunk, or TRL), then runs one PPO iteration each time the parent asks, and answers with the
seconds it spent per phase. Separate processes keep the sides' memory apart (each reports its own
peak) and let the parent alternate them, so a change in machine load hits both alike.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload import (  # noqa: E402
    ToyReward,
    ToyRewardModel,
    Work,
    build_models,
    make_prompts,
    matmul_params,
    rss_mib,
    smollm2_tokenizer,
)

PHASES = ("generate", "forward", "reward", "train")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib()[1]


class PpolmSide:
    """ppolm's Trainer; ``shared=True`` is ppolm's default (value head on the policy's trunk)."""

    def __init__(self, work: Work, shared: bool) -> None:
        from ppolm import (
            CallableReward,
            HFPolicy,
            PPOConfig,
            SequenceClassifierReward,
            TextGenerationEnv,
            Trainer,
            ValueHead,
        )

        self.work = work
        tok = smollm2_tokenizer()
        prompts = make_prompts(tok, work.num_prompts, work.prompt_len)
        models = build_models(tok, work)
        policy = HFPolicy(models["policy"])
        value_head = None if shared else ValueHead.separate(policy, init_std=1e-3)
        if work.reward == "toy":
            toy = ToyReward(tok, models["policy"].get_input_embeddings().weight)
            reward: Any = CallableReward(lambda ps, rs: toy(rs))
        else:
            reward = SequenceClassifierReward(models["reward"].to(work.device), tok)
        env = TextGenerationEnv(prompts, tok, reward, max_new_tokens=work.response_len,
                                ignore_eos=True, seed=work.seed)
        self.out_dir = tempfile.mkdtemp(prefix="ppolm-bench-")
        fast = work.engine == "fast_cpu" or (work.engine == "auto"
                                             and not work.device.startswith("cuda"))
        config = PPOConfig(
            iterations=10**6, batch_size=work.batch_size, minibatch_size=work.minibatch_size,
            ppo_epochs=work.ppo_epochs, learning_rate=work.learning_rate,
            temperature=work.temperature, kl_coef=work.kl_coef, vf_coef=work.vf_coef,
            adam_eps=1e-8, max_grad_norm=None, lr_schedule="constant", ent_coef=0.0,
            seed=work.seed, device=work.device, bf16=work.bf16,
            engine=work.engine, progress=False, output_dir=self.out_dir,
            # the fast CPU engine's switches as `ppolm train` sets them (opt-in from Python)
            **(dict(cpu_bf16=work.bf16, compile=work.compile, keep_freed_memory=True)
               if fast else {}))
        self.trainer = Trainer(policy, env, config, value_head=value_head)
        self.n_params = {
            "policy": matmul_params(models["policy"]),
            "value": 0 if shared else matmul_params(models["value"]),
            "reward": matmul_params(models["reward"]) if work.reward != "toy" else 0,
        }
        self.notes = {"bf16_autocast": bool(work.bf16), "compile": work.compile,
                      "engine": self.trainer.engine.name,
                      "fused_adamw": bool(self.trainer.engine.optimizer.defaults.get("fused")),
                      "torch_huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}

    def step(self) -> dict[str, float]:
        from ppolm.observe.timer import Timer

        tr = self.trainer
        timer = Timer()
        t0 = time.perf_counter()
        episodes, rollout = tr.collect(timer)
        with timer("time_train"):
            advantages = tr.compute_advantages(rollout)
            stats = tr.update(rollout, advantages)
        tr.iteration += 1
        row = tr.log(episodes, rollout, advantages, stats, timer)
        tr.kl_ctl.update(row["kl"], self.work.batch_size)
        _sync(self.work.device)
        total = time.perf_counter() - t0
        sec = timer.seconds
        return {"total": total, "generate": sec["time_generate"], "forward": sec["time_forward"],
                "reward": sec["time_reward"], "train": sec["time_train"],
                "score": row["score_mean"], "kl": row["kl"], "response_len":
                row["response_length"], "approx_kl": row["approx_kl"]}


class TrlSide:
    """TRL's experimental PPOTrainer, stepped one iteration at a time.

    TRL's ``train()`` is one loop over all iterations; it runs in a thread here, and a callback
    at the end of each iteration hands control back to the parent. The phases are timed by
    wrapping the functions TRL calls for them (generation, forward passes, reward model).
    """

    def __init__(self, work: Work) -> None:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as trl_ppo

        self.work = work
        tok = smollm2_tokenizer()
        prompts = make_prompts(tok, work.num_prompts, work.prompt_len)
        models = build_models(tok, work)
        policy, value = models["policy"], models["value"]
        toy = work.reward == "toy"
        reward = (ToyRewardModel(ToyReward(tok, policy.get_input_embeddings().weight),
                                 work.response_len) if toy else models["reward"])
        ref = copy.deepcopy(policy)
        dataset = Dataset.from_dict({"input_ids": tok(prompts)["input_ids"]})
        cuda = work.device.startswith("cuda")
        self.out_dir = tempfile.mkdtemp(prefix="trl-bench-")
        args = PPOConfig(
            output_dir=self.out_dir, use_cpu=not cuda, bf16=work.bf16,
            per_device_train_batch_size=work.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=work.num_minibatches, num_ppo_epochs=work.ppo_epochs,
            response_length=work.response_len, stop_token=None, total_episodes=10**8,
            learning_rate=work.learning_rate, lr_scheduler_type="constant",
            temperature=work.temperature, kl_coef=work.kl_coef, vf_coef=work.vf_coef,
            local_rollout_forward_batch_size=work.batch_size, num_sample_generations=0,
            report_to=[], disable_tqdm=True, save_strategy="no", logging_strategy="no",
            seed=work.seed, dataloader_num_workers=0,
            # TRL's PPO loop never turns it on (its default True only sets kwargs); said
            # explicitly: both sides do one forward and one backward per minibatch.
            gradient_checkpointing=False)
        if work.bf16:
            # TRL's PPO makes its own Accelerator, which reads the precision from the
            # environment only (as `accelerate launch --mixed_precision bf16` sets it).
            os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        self.phase: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.scores: list[float] = []
        self._wrap(trl_ppo, reward)

        side = self

        class Handoff(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                side._end_of_iteration()

        self.trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                                  reward_model=reward, train_dataset=dataset, value_model=value,
                                  callbacks=[Handoff()])
        self.n_params = {"policy": matmul_params(policy), "value": matmul_params(value),
                         "reward": matmul_params(reward) if work.reward != "toy" else 0}
        self.notes = {"mixed_precision": str(self.trainer.accelerator.mixed_precision),
                      "dynamo_backend": str(self.trainer.accelerator.state.dynamo_plugin.backend),
                      "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
                      "optimizer": type(self.trainer.optimizer.optimizer).__name__,
                      "fused_adamw": bool(self.trainer.optimizer.optimizer.defaults.get("fused"))}
        self._go, self._done = threading.Event(), threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = False

    def _wrap(self, mod: Any, reward_model: Any) -> None:
        """Time TRL's phases by wrapping the module functions its loop calls."""
        side = self
        dev = self.work.device
        gen, fwd, get_reward = mod.batch_generation, mod.forward, mod.get_reward

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                out = fn(*a, **k)
                _sync(dev)
                side.phase[name] += time.perf_counter() - t0
                return out
            return wrapper

        def forward(model: Any, *a: Any, **k: Any) -> Any:
            # Without grad: the reference forward of the rollout; with grad: a training step.
            if torch.is_grad_enabled():
                return fwd(model, *a, **k)
            return timed("forward", fwd)(model, *a, **k)

        def reward_or_value(model: Any, *a: Any, **k: Any) -> Any:
            name = "reward" if model is reward_model else "forward"
            out = timed(name, get_reward)(model, *a, **k)
            if name == "reward":
                side.scores.append(float(out[1].float().mean()))
            return out

        mod.batch_generation = timed("generate", gen)
        mod.forward = forward
        mod.get_reward = reward_or_value

    # --- the thread running TRL's train() ---------------------------------------------------
    def _run(self) -> None:
        try:
            self._go.wait()
            self._go.clear()
            self._t0 = time.perf_counter()
            self.trainer.train()
        except BaseException as e:  # handed to the parent through step()
            self._error = e
        finally:
            self._done.set()

    def _end_of_iteration(self) -> None:
        _sync(self.work.device)
        self._t1 = time.perf_counter()
        self._done.set()
        self._go.wait()
        self._go.clear()
        if self._stop:
            raise KeyboardInterrupt
        self._t0 = time.perf_counter()

    def step(self) -> dict[str, float]:
        self.phase = dict.fromkeys(PHASES, 0.0)
        self.scores = []
        self._done.clear()
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.set()
        self._done.wait()
        if self._error is not None:
            raise self._error
        total = self._t1 - self._t0
        out = dict(self.phase)
        out["train"] = total - sum(out[p] for p in ("generate", "forward", "reward"))
        out["total"] = total
        out["score"] = sum(self.scores) / max(len(self.scores), 1)
        return out

    def close(self) -> None:
        if self._started:
            self._stop = True
            self._go.set()
            self._thread.join(timeout=30)


def worker(conn: Any, side: str, work_dict: dict[str, Any]) -> None:
    """Worker process: build ``side``, then serve ("step",) / ("stop",) requests."""
    import warnings

    warnings.simplefilter("ignore")           # deprecation chatter of transformers and TRL
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    work = Work(**work_dict)
    torch.set_num_threads(work.threads)
    if not os.environ.get("PPOLM_BENCH_VERBOSE"):
        devnull = open(os.devnull, "w")  # noqa: SIM115 (TRL prints its metrics every iteration)
        os.dup2(devnull.fileno(), 1)
    import transformers  # noqa: F401  (imports count in the baseline, not in the run)

    if side == "trl":
        if work.compile_trl:      # read by the Accelerator that TRL's PPOTrainer makes
            os.environ["ACCELERATE_DYNAMO_BACKEND"] = "inductor"
        import trl.experimental.ppo  # noqa: F401
    else:
        import ppolm  # noqa: F401
    baseline = rss_mib()[0]
    runner: Any = None
    try:
        t0 = time.perf_counter()
        runner = TrlSide(work) if side == "trl" else PpolmSide(work, shared=side == "shared")
        conn.send({"ok": True, "build_s": time.perf_counter() - t0, "n_params": runner.n_params,
                   "baseline_mib": baseline, "notes": runner.notes})
        while True:
            cmd = conn.recv()
            if cmd == "stop":
                break
            if cmd == "reset_peak" and work.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                conn.send({"ok": True})
                continue
            result = runner.step()
            result["peak_mib"] = _peak_mib(work.device)
            conn.send({"ok": True, **result})
        if isinstance(runner, TrlSide):
            runner.close()
    except BaseException as e:
        import traceback

        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()})
    finally:
        conn.close()
        if runner is not None:      # the side's output folder (metrics, TRL's logs)
            shutil.rmtree(runner.out_dir, ignore_errors=True)
