"""Command line: ``ppolm train [CONFIG.yaml] [key=value ...] [--resume]``,
``ppolm report RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ppolm.errors import PPOLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppolm", description="PPO for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a policy with PPO",
                           description="Train with PPO. With no config: a small transformer on "
                           "the built-in 'continue' toy task (under 2 minutes on a 2-core CPU).")
    train.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value",
                       help="an optional YAML config, then overrides such as "
                       "ppo.learning_rate=1e-4, model.kind=lstm or iterations=20")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint in output_dir")
    sub.add_parser("show-config", help="print the built-in default run's config as YAML")
    report = sub.add_parser("report", help="write an HTML page of a run (curves, samples, "
                            "warnings, config)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    report.add_argument("-o", "--out", help="the HTML file (default RUN_DIR/report.html)")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "show-config":
            import yaml

            from ppolm.run import RunSpec

            print(yaml.safe_dump(RunSpec.load(None, []).to_dict(), sort_keys=False), end="")
            return 0
        if ns.command == "report":
            from ppolm.evaluation.report import write_report

            print(f"report: {write_report(ns.run_dir, ns.out)}")
            return 0
        return _train(ns.args, ns.resume)
    except PPOLMError as e:
        print(f"ppolm: error: {e}", file=sys.stderr)
        return 2


def _train(args: list[str], resume: bool) -> int:
    import yaml

    from ppolm.run import RunSpec, build_run

    config = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if config else args
    name = Path(config).stem if config else "default"
    spec = RunSpec.load(config, overrides, fill=lambda ppo: command_line_defaults(ppo, name))
    trainer = build_run(spec)
    main = trainer.world.is_main           # under torchrun, rank 0 alone writes and prints
    say = print if main else (lambda *a, **k: None)
    out = Path(str(spec.ppo.output_dir))
    if resume:
        say(f"resumed at iteration {trainer.resume()}")
    else:
        trainer.start_fresh()        # refuse an earlier run before writing anything here
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    what = f"task={spec.task}" if spec.task and not spec.prompts else f"prompts={spec.prompts}"
    n = trainer.world.size
    ranks = f" on {n} rank{'s' if n > 1 else ''} ({spec.ppo.distributed})" if \
        trainer.world.distributed else ""
    say(f"ppolm: training a {spec.model.kind} policy on {what} for "
        f"{spec.ppo.iterations} iterations{ranks}")
    history = trainer.train()
    if history:
        k = max(1, len(history) // 10)
        first = sum(r["score_mean"] for r in history[:k]) / k
        last = sum(r["score_mean"] for r in history[-k:]) / k
        say(f"reward (score mean over {k} iterations): first {first:.3f} -> last {last:.3f}; "
            f"final KL {history[-1]['kl']:.2f} nats")
    say(f"metrics: {out / 'metrics.jsonl'}")
    say(f"checkpoints: {out / 'checkpoints'}")
    return 0


def command_line_defaults(ppo: dict[str, Any], name: str) -> dict[str, Any]:
    """What the command sets where the config leaves it open (``ppo``: the PPOConfig values so
    far): an output_dir (runs/NAME), and, on the fast CPU engine, malloc keeping freed memory
    (process-wide, which a command may decide for its process and a library may not)."""
    from ppolm.engines.factory import resolve_device
    from ppolm.parallel.world import launched

    fill: dict[str, Any] = {"output_dir": f"runs/{name}"}
    if ppo.get("engine", "auto") != "plain" and not launched() and resolve_device(
            str(ppo.get("device", "auto"))).type == "cpu":
        fill["keep_freed_memory"] = True
    return fill


if __name__ == "__main__":
    raise SystemExit(main())
