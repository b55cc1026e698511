"""Command line: ``ppolm train [CONFIG.yaml] [key=value ...] [--resume]``,
``ppolm train-rm CONFIG.yaml [key=value ...] [--resume]``, ``ppolm export RUN_DIR OUT
[--no-merge]``, ``ppolm report RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from ppolm.errors import PPOLMError

#: The training commands: name -> (help, description, help of the arguments).
COMMANDS = {
    "train": ("train a policy with PPO",
              "Train with PPO. With no config: a small transformer on the built-in 'continue' "
              "toy task (under 2 minutes on a 2-core CPU).",
              "an optional YAML config, then overrides such as ppo.learning_rate=1e-4, "
              "model.kind=lstm or iterations=20"),
    "train-rm": ("train a reward model on preference pairs",
                 "Train a Bradley-Terry reward model on preference pairs and write it to "
                 "output_dir/model (an AutoModelForSequenceClassification folder with its "
                 "reward normalisation). See docs/reward-models.md.",
                 "a YAML config (model, train, eval, columns, training), then overrides such "
                 "as training.learning_rate=1e-4 or steps=100"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppolm", description="PPO for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helps in COMMANDS.items():
        command = sub.add_parser(name, help=helps[0], description=helps[1])
        command.add_argument("args", nargs="*" if name == "train" else "+",
                             metavar="CONFIG.yaml | key=value", help=helps[2])
        command.add_argument("--resume", action="store_true",
                             help="continue from the newest complete checkpoint in output_dir")
    sub.add_parser("show-config", help="print the built-in default run's config as YAML (the "
                   "demo's own values marked with the defaults they replace)")
    report = sub.add_parser("report", help="write an HTML page of a run (curves, samples, "
                            "warnings, config)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    report.add_argument("-o", "--out", help="the HTML file (default RUN_DIR/report.html)")
    export = sub.add_parser("export", help="write the newest checkpoint of a run as a "
                            "transformers model folder (save_pretrained)",
                            description="The policy of the newest checkpoint of RUN_DIR (one "
                            "process or sharded) as a save_pretrained folder: weights (LoRA "
                            "merged), tokenizer, generation config, the value head beside them.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir")
    export.add_argument("out", metavar="OUT", help="the folder to write")
    export.add_argument("--no-merge", action="store_true",
                        help="LoRA: write the adapters alone (adapter_config.json and "
                        "adapter_model.safetensors) instead of merged weights")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "show-config":
            print(_show_config(), end="")
            return 0
        if ns.command == "report":
            from ppolm.evaluation.report import write_report

            print(f"report: {write_report(ns.run_dir, ns.out)}")
            return 0
        if ns.command == "export":
            from ppolm.checkpoint.run_export import export_run

            print(f"model: {export_run(ns.run_dir, ns.out, merge=not ns.no_merge)}")
            return 0
        if ns.command == "train-rm":
            return _train_rm(ns.args, ns.resume)
        return _train(ns.args, ns.resume)
    except PPOLMError as e:
        print(f"ppolm: error: {e}", file=sys.stderr)
        return 2


def _show_config() -> str:
    from ppolm.config.yaml_io import commented_yaml
    from ppolm.run import RunSpec

    note = ("The built-in demo run (ppolm train without a config file). A value marked\n"
            "'# default: X' is the demo's own; every other is the default (the same from\n"
            "Python). output_dir null: ppolm train writes to runs/<config file name>.\n"
            "Relative paths in a config file are read from the file's folder.")
    return commented_yaml(RunSpec.load(None, []).to_dict(), RunSpec().to_dict(), note)


def _load_spec(config: str | None, overrides: list[str], name: str) -> Any:
    """The run spec, with a setting at an old place said as a warning on stderr."""
    from ppolm.run import RunSpec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecationWarning)
        spec = RunSpec.load(config, overrides,
                            fill=lambda ppo: command_line_defaults(ppo, name))
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            print(f"ppolm: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return spec


def _check_resume(spec: Any) -> None:
    """Before anything loads: refuse settings a resume may not change (against the run.yaml
    of the run being resumed; ``ppolm.config.resume`` says which may change)."""
    import yaml

    from ppolm.config.resume import check_resume, run_spec_changes

    saved = Path(str(spec.ppo.output_dir)) / "run.yaml"
    if saved.is_file():
        check_resume(run_spec_changes(yaml.safe_load(saved.read_text()) or {},
                                      spec.to_dict())[1])


def _train(args: list[str], resume: bool) -> int:
    import yaml

    from ppolm.run import build_run

    config = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if config else args
    name = Path(config).stem if config else "default"
    spec = _load_spec(config, overrides, name)
    if resume:
        _check_resume(spec)
    trainer = build_run(spec)
    main = trainer.world.is_main           # under torchrun, rank 0 alone writes and prints
    say = print if main else (lambda *a, **k: None)
    out = Path(str(spec.ppo.output_dir))
    start = 0
    if resume:
        start = trainer.resume()
        say(f"resumed at iteration {start}")
    else:
        trainer.start_fresh()        # refuse an earlier run before writing anything here
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    what = f"task={spec.task}" if spec.task and not spec.prompts else f"prompts={spec.prompts}"
    say(f"ppolm: training a {spec.model.kind} policy on {what} for "
        f"{spec.ppo.iterations} iterations{_on_ranks(trainer.world, spec.ppo.distributed)}")
    history = trainer.train()
    if history:
        k = max(1, len(history) // 10)
        first = sum(r["score_mean"] for r in history[:k]) / k
        last = sum(r["score_mean"] for r in history[-k:]) / k
        # after a resume the first iterations of this command are not the run's first
        label = "first" if start == 0 else f"first after resume (iteration {start + 1})"
        say(f"reward (score mean over {k} iterations): {label} {first:.3f} -> last "
            f"{last:.3f}; final KL {history[-1]['kl']:.2f} nats")
    say(f"metrics: {out / 'metrics.jsonl'}")
    say(f"checkpoints: {out / 'checkpoints'}")
    if spec.model.kind in ("hf", "smollm2") and main:
        # the final model as a transformers folder, as TRL's trainers save theirs (rank 0
        # reads the last checkpoint, sharded or not, once every rank has written it)
        from ppolm.checkpoint.run_export import export_run

        say(f"model: {export_run(out, out / 'model')}")
    return 0


def _train_rm(args: list[str], resume: bool) -> int:
    import yaml

    from ppolm.config.reward_model import RewardModelSpec
    from ppolm.errors import ConfigError
    from ppolm.reward_modeling.build import build_reward_model_run

    if "=" in args[0]:
        raise ConfigError("train-rm needs a config file first (CONFIG.yaml), then key=value "
                          "overrides.")
    spec = RewardModelSpec.load(args[0], args[1:], output_dir=f"runs/{Path(args[0]).stem}")
    trainer = build_reward_model_run(spec)
    say = print if trainer.world.is_main else (lambda *a, **k: None)
    out = Path(str(spec.training.output_dir))
    if resume:
        say(f"resumed at step {trainer.resume()}")
    else:
        trainer.start_fresh()
    if trainer.world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    held = len(trainer.eval_pairs) if trainer.eval_pairs is not None else 0
    say(f"ppolm: training a reward model on {len(trainer.train_pairs)} pairs ({held} held out) "
        f"for {trainer.total_steps} steps{_on_ranks(trainer.world, spec.training.distributed)}")
    trainer.train()
    last = next((r for r in reversed(trainer.history) if "eval/accuracy" in r), None)
    if last is not None:
        say(f"held-out pair accuracy {last['eval/accuracy']:.3f}, mean margin "
            f"{last['eval/margin']:.3f} (step {last['iteration']})")
    say(f"metrics: {out / 'metrics.jsonl'}")
    say(f"model: {trainer.save_model(out / 'model')}")
    return 0


def _on_ranks(world: Any, distributed: str) -> str:
    """What a command says of the ranks: ' on 2 ranks (fsdp)' under torchrun, '' in one
    process."""
    n = world.size
    return f" on {n} rank{'s' if n > 1 else ''} ({distributed})" if world.distributed else ""


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
