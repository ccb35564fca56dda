"""Which TP/EP/PP/DP layouts of a job fit the GPUs' memory? Planned on the CPU, no GPU or weights.

    python tools/plan_layout.py --preset qwen3_moe --gpus 16 --gpu-memory 80
    python tools/plan_layout.py --preset qwen3_moe --gpus 16 --gpu-memory 80 --seq-length 4096 \\
        --micro-batch-size 2 --layout 1,2,8 --check-conversion
    python tools/plan_layout.py --preset qwen3_moe --gpus 8 --gpu-memory 80 --lora-rank 16 \
        --expert-adapters per_expert --router full --smallest

The model is built whole on the meta device; each rank's parameters are counted exactly from
megatron's sharding rules (sara_megatron/planning/parameters.py). Weights, gradients, optimizer
state and activations per GPU are ESTIMATES from the formulas in sara_megatron/planning/memory.py
(GB = 1e9 bytes). --lora-rank plans a LoRA run instead of full fine-tuning: the base frozen (bf16
weights only), gradients and optimizer state for the adapters (and the router when trained;
sara_megatron/planning/lora.py). --smallest plans the smallest job of at most --gpus GPUs that
has a layout that fits. --check-conversion also checks, at every fitting layout, that the converter maps
every hub tensor of transformers' model (meta device) to its Megatron shards exactly once.
"""

import argparse
import json
import sys

from sara_megatron.models.architecture import PRESET_NAMES, resolve_architecture
from sara_megatron.planning.lora import EXPERT_ADAPTERS, ROUTER_MODES, TARGETS, LoraSpec
from sara_megatron.planning.memory import ATTENTION_KINDS, RECOMPUTE_MODES, Layout, TrainingShape
from sara_megatron.tool_errors import report_user_error


def parse_args(argv=None):
    """The checked command line, with `arch`, `shape` (the `TrainingShape`) and `lora` added.

    Args:
        argv: The arguments after the program's name; None reads them from the command line.

    Raises:
        SystemExit: 2, with the parser's one-line message, for an argument that does not check.
    """
    p = argparse.ArgumentParser(prog="plan_layout.py", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", required=True,
                   help=f"a preset ({', '.join(PRESET_NAMES)}) or an HF config.json / its folder")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU, GB")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="optimizer state sharded over data parallel (default: yes, as the trainer)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none",
                   help="activation recompute (the trainer's model.recompute: true is selective)")
    p.add_argument("--attention", choices=ATTENTION_KINDS, default="flash",
                   help="flash: Transformer Engine on GPU; unfused: megatron's local attention")
    p.add_argument("--reserve", type=float, default=6.0,
                   help="GB per GPU kept free for what the formulas leave out (assumed margin)")
    p.add_argument("--layout", help="plan only TP,PP,EP (e.g. 1,2,8)")
    p.add_argument("--smallest", action="store_true",
                   help="plan the smallest job of 1 ... --gpus GPUs that has a fitting layout")
    lora = p.add_argument_group("LoRA (plan a LoRA run; the other flags need --lora-rank)")
    lora.add_argument("--lora-rank", type=int, help="adapter rank r")
    lora.add_argument("--lora-targets",
                      help=f"comma-separated, of {', '.join(TARGETS)} "
                           f"(default {','.join(LoraSpec(1).targets)})")
    lora.add_argument("--expert-adapters", choices=EXPERT_ADAPTERS, default=None,
                      help=f"one adapter per expert or one shared by a layer's experts "
                           f"(default {LoraSpec(1).expert_adapters})")
    lora.add_argument("--router", choices=ROUTER_MODES, default=None,
                      help=f"router trained fully, by a LoRA, or frozen "
                           f"(default {LoraSpec(1).router})")
    p.add_argument("--check-conversion", action="store_true",
                   help="check the HF <-> Megatron mapping at every fitting layout (meta tensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus must be >= 1, got {args.gpus}")
    if args.gpu_memory <= 0:
        p.error(f"--gpu-memory must be > 0 GB, got {args.gpu_memory:g}")
    try:
        args.arch = resolve_architecture(args.preset)
        args.shape = TrainingShape(
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
            attention=args.attention, reserve_gb=args.reserve,
        )
    except (ValueError, OSError) as err:
        p.error(str(err))
    args.lora = None
    if args.lora_rank is None:
        for flag, value in (("--lora-targets", args.lora_targets),
                            ("--expert-adapters", args.expert_adapters), ("--router", args.router)):
            if value is not None:
                p.error(f"{flag} needs --lora-rank")
    else:
        default = LoraSpec(1)
        targets = (default.targets if args.lora_targets is None else
                   tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
        try:
            args.lora = LoraSpec(
                rank=args.lora_rank, targets=targets,
                expert_adapters=args.expert_adapters or default.expert_adapters,
                router=args.router or default.router)
        except ValueError as err:
            p.error(str(err))
    args.only = None
    if args.layout:
        try:
            tp, pp, ep = (int(x) for x in args.layout.split(","))
        except ValueError:
            p.error(f"--layout: TP,PP,EP expected (three integers), got {args.layout!r}")
        if min(tp, pp, ep) < 1 or args.gpus % (tp * pp):
            p.error(f"--layout {args.layout}: TP·PP must divide --gpus {args.gpus}")
        args.only = Layout(tp=tp, pp=pp, ep=ep, dp=args.gpus // (tp * pp))
    return args


def main(argv=None) -> int:
    """The `plan_layout` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    args = parse_args(argv)
    from sara_megatron.planning.planner import plan_model

    try:
        result = plan_model(args.preset, args.arch, args.gpus, args.gpu_memory, args.shape,
                            only=args.only, check_conversion=args.check_conversion,
                            lora=args.lora, smallest=args.smallest)
    except Exception as err:  # noqa: BLE001 - a user error is one line; anything else raises
        return report_user_error("plan_layout.py", err)
    print(json.dumps(result.to_json()) if args.json else result.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
