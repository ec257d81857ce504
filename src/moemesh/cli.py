"""Command line: `moemesh train [CONFIG] [--set key=value ...]`, `moemesh export-hf`, `moemesh import-hf`,
`moemesh sample`, `moemesh plan`, `moemesh draw`, `moemesh plot`.

User errors print one line `moemesh: error: ...` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import metadata

from moemesh import __version__
from moemesh.config import preset_names
from moemesh.errors import UserError, report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(f"{message} (see {self.prog} --help)")


def version() -> str:
    """The installed distribution's version; the package's own when running from a source tree."""
    try:
        return metadata.version("moemesh")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moemesh", description="Train Mixture-of-Experts transformers on a DP x EP x TP mesh.")
    parser.add_argument("--version", action="version", version=f"moemesh {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model", description=(
        "Train from a preset name or TOML file (default: the 'tiny' preset). "
        "Override any field with --set section.key=value, e.g. --set train.steps=50. "
        f"Presets: {', '.join(preset_names())}."))
    train.add_argument("config", nargs="?", default=None, help="preset name or path to a TOML config")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable)")
    export = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face Mixtral directory",
                            description="Write RUN_OR_CHECKPOINT (a run dir: its newest complete checkpoint) as a "
                                        "MixtralForCausalLM directory: config.json, safetensors shards and their "
                                        "index. "
                                        "OUT_DIR must not exist or be empty.")
    export.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    export.add_argument("out_dir", metavar="OUT_DIR")
    export.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    export.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 500MB (default 5GB)")
    imp = sub.add_parser("import-hf", help="make a local Hugging Face Mixtral directory a moemesh run",
                         description="Read HF_DIR (config.json and safetensors) into RUN_DIR/config.toml and the "
                                     "checkpoint RUN_DIR/checkpoints/step_000000; continue with `moemesh train "
                                     "RUN_DIR/config.toml`. model.* comes from config.json; set anything else "
                                     "with --set. RUN_DIR must not exist or be empty.")
    imp.add_argument("hf_dir", metavar="HF_DIR")
    imp.add_argument("run_dir", metavar="RUN_DIR")
    imp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (repeatable)")
    sample = sub.add_parser("sample", help="print a continuation of a prompt",
                            description="Load RUN_OR_CHECKPOINT in this process and continue --prompt (text for "
                                        "text runs, space-separated token ids otherwise).")
    sample.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0: all)")
    sample.add_argument("--seed", type=int, default=0)
    _add_planner_commands(sub)
    return parser


def _add_planner_commands(sub) -> None:
    plan = sub.add_parser("plan", help="rank (dp, ep, tp) layouts by predicted step time and memory",
                          description="Enumerate every valid (dp, ep, tp) for --gpus GPUs, with sequence parallelism "
                                      "and activation checkpointing; predict per-GPU memory and step time; rank "
                                      "those that fit. docs/planner.md explains the model.")
    plan.add_argument("config", nargs="?", default=None, help="preset name or TOML config (default tiny)")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu", default="h200", help="h200 (default), h100 or a100")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--calibrate", action="append", default=[], metavar="JSON",
                      help="fit the constants to the calibration runs of a bench JSON (repeatable)")
    plan.add_argument("--imbalance", type=float, default=1.3, help="max/mean tokens per expert rank (default 1.3)")
    plan.add_argument("--sharded-init", action="store_true",
                      help="ignore the full-model build on each GPU (as if it were initialised sharded)")
    plan.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    plan.add_argument("--json", action="store_true")
    draw = sub.add_parser("draw", help="draw the device mesh (GPUs, groups, experts, collectives)",
                          description="Draw the dp x ep x tp mesh: GPUs in their TP groups, the experts each EP rank "
                                      "holds, the data replicas, and which collective runs on which axis. The "
                                      "groups are those the real Mesh builds (on a fake process group). Sizes "
                                      "come from --dp/--ep/--tp, or from CONFIG's parallel.* and model.num_experts.")
    draw.add_argument("config", nargs="?", default=None, help="optional preset name or TOML config")
    draw.add_argument("--dp", type=int, default=0)
    draw.add_argument("--ep", type=int, default=0)
    draw.add_argument("--tp", type=int, default=0)
    draw.add_argument("--experts", type=int, default=None, help="number of routed experts (labels each EP rank)")
    draw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    draw.add_argument("-o", "--output", default="mesh.png", help="output file, .png or .svg (default mesh.png)")
    plot = sub.add_parser("plot", help="plot a run's loss curves and expert load",
                          description="Write loss.png (train loss, lm_loss, val_loss if present) and "
                                      "expert_load.png (per MoE layer, expert x step) from RUN_DIR/metrics.jsonl.")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("-o", "--output", default=None, metavar="DIR", help="where to write (default: RUN_DIR)")


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from moemesh.config import load_config

        cfg = load_config(args.config, args.overrides)
        from moemesh.launch import train_command  # imports torch: after the config is known to be valid

        return train_command(cfg)
    if args.command == "export-hf":
        from moemesh.hf.convert import export_command

        return export_command(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    if args.command == "import-hf":
        from moemesh.hf.convert import import_command

        return import_command(args.hf_dir, args.run_dir, args.overrides)
    if args.command == "sample":
        from moemesh.sample import sample_command

        return sample_command(args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed)
    if args.command == "plan":
        from moemesh.plan.search import plan_command

        return plan_command(args.config, args.overrides, args.gpus, args.gpus_per_node, args.gpu, args.calibrate,
                            args.json, args.top, args.imbalance, args.sharded_init)
    if args.command == "draw":
        from moemesh.plan.draw import draw_command

        return draw_command(args.dp, args.ep, args.tp, args.experts, args.config, args.overrides, args.output)
    if args.command == "plot":
        from moemesh.plan.plot import plot_command

        return plot_command(args.run_dir, args.output)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as exc:
        report(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        report("interrupted")
        return 130
    except BrokenPipeError:
        # The reader of our output has gone (`moemesh plan ... | head`): nothing to say, and nothing left
        # to flush at exit, which would raise again; a shell's exit status for SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
