"""Hugging Face ⇄ Megatron-Core checkpoints for Qwen3-MoE and PhiMoE.

    python tools/convert_hf.py import --hf-dir HF --out MCORE [--tp N --ep N --pp N] [--dtype bf16|fp32]
    python tools/convert_hf.py export --megatron-dir MCORE --out HF2
    python tools/convert_hf.py export --megatron-dir LORA_CKPT --out HF2 --merge-adapters [--base-dir BASE]
    python tools/convert_hf.py export --megatron-dir LORA_CKPT --out ADAPTER --peft-adapter
    python tools/convert_hf.py verify --hf-dir HF --megatron-dir MCORE [--seq-len N --batch N]

`import` runs in one process or under torchrun (each rank converts and holds only its shard; the
world size must fit the layout). `export` and `verify` run in one process; `export` refuses to
start as one of several torchrun / srun processes (they would all write the same output).
A LoRA run's checkpoint holds the adapters and the trained router only: `--merge-adapters`
writes the base (the checkpoint the run recorded, or --base-dir of the same fingerprint) with
W + (alpha/r)·B·A merged in; `--peft-adapter` writes the adapters (attention; Qwen3-MoE's experts
on transformers' fused expert parameters) and a trained router (as a module to save) in PEFT's
layout (docs/peft.md).
`verify` prints one JSON line and, past its thresholds, one line naming each check that failed
and its threshold, and exits 1. Bad input exits 2 with the reason.
The logic lives in `sara_megatron.conversion`.
"""

from __future__ import annotations

import argparse
import json
import sys

from sara_megatron.tool_errors import check_writable_output, report_user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF safetensors folder -> Megatron-Core checkpoint")
    imp.add_argument("--hf-dir", required=True, help="HF folder: config.json + safetensors")
    imp.add_argument("--out", required=True, help="Megatron checkpoint folder to create")
    imp.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    imp.add_argument("--ep", type=int, default=1, help="expert parallel size (default 1)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline parallel size (default 1)")
    imp.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                     help="parameter dtype (default: the source's when all bf16 or all fp32, else fp32)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    exp = sub.add_parser("export", help="Megatron-Core checkpoint -> HF safetensors folder")
    exp.add_argument("--megatron-dir", required=True)
    exp.add_argument("--out", required=True, help="HF folder to create")
    exp.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                     help="output dtype (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file before sharding with an index (default 5GB)")
    exp.add_argument("--hf-dir", default=None,
                     help="config.json + tokenizer source, for a checkpoint without conversion "
                          "metadata (sara_conversion.json): e.g. one trained from a preset's "
                          "random weights. Imported checkpoints, and those of a run started "
                          "from one (model.checkpoint), carry theirs")
    exp.add_argument("--read-batch-mb", type=int, default=512,
                     help="Megatron tensors read per batch, in MiB (bounds export memory)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    lora = exp.add_mutually_exclusive_group()
    lora.add_argument("--merge-adapters", action="store_true",
                      help="--megatron-dir is a LoRA checkpoint: write its base with the adapters "
                           "merged (W + alpha/r·B·A) and the trained router")
    lora.add_argument("--peft-adapter", action="store_true",
                      help="--megatron-dir is a LoRA checkpoint: write adapter_config.json and "
                           "adapter_model.safetensors in PEFT's layout (attention and Qwen3-MoE "
                           "expert adapters; a trained router as a module to save)")
    exp.add_argument("--base-dir", default=None,
                     help="the LoRA checkpoint's base, when not where the run recorded it (its "
                          "fingerprint must be the recorded one)")

    ver = sub.add_parser("verify", help="logits of transformers' model vs ours on the same tokens")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--megatron-dir", required=True)
    ver.add_argument("--seq-len", type=int, default=64,
                     help="tokens per sequence (default 64; keep PhiMoE below its longrope "
                          "switch, see sara_megatron/conversion/verify.py)")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--seed", type=int, default=0)
    ver.add_argument("--max-abs-diff", type=float, default=1e-4,
                     help="fail above this max |logits difference| (default 1e-4)")
    ver.add_argument("--min-argmax-agreement", type=float, default=1.0,
                     help="fail below this fraction of agreeing argmax tokens (default 1.0)")
    ver.add_argument("--min-cosine", type=float, default=None,
                     help="fail below this smallest per-position cosine (default: not checked)")
    return p


def main(argv=None) -> int:
    """The `convert_hf` tool: parse `argv` and run it.

    Args:
        argv: the arguments after the program's name; None reads them from the command line.

    Returns:
        The exit status (None or 0 on success). An error the user can fix exits 2 with one
        line, `<tool>: error: <message>`; anything else raises.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    tool = f"convert_hf.py {args.command}"
    if args.command in ("import", "export"):
        try:  # before anything is read or computed
            check_writable_output(args.out, "--out")
        except OSError as err:
            return report_user_error(tool, err)
        from sara_megatron.launch import exit_with_parent

        exit_with_parent()

    try:
        if args.command == "import":
            from sara_megatron.conversion.hf_import import import_hf_checkpoint
            from sara_megatron.distributed import destroy_distributed

            import_hf_checkpoint(args.hf_dir, args.out, tp=args.tp, ep=args.ep, pp=args.pp,
                                 dtype=args.dtype, overwrite=args.overwrite)
            destroy_distributed()
            return 0
        if args.command == "export" and args.peft_adapter:
            from sara_megatron.conversion.lora_export import export_peft_adapter

            export_peft_adapter(args.megatron_dir, args.out, base_dir=args.base_dir,
                                overwrite=args.overwrite, dtype=args.dtype, hf_dir=args.hf_dir)
            return 0
        if args.command == "export":
            from sara_megatron.conversion.hf_export import export_hf_checkpoint
            from sara_megatron.conversion.lora_export import export_merged

            options = dict(overwrite=args.overwrite, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, hf_dir=args.hf_dir,
                           read_batch_bytes=args.read_batch_mb * 2**20)
            if args.merge_adapters:
                export_merged(args.megatron_dir, args.out, base_dir=args.base_dir, **options)
            elif args.base_dir:
                raise ValueError("--base-dir goes with --merge-adapters or --peft-adapter")
            else:
                export_hf_checkpoint(args.megatron_dir, args.out, **options)
            return 0
        from sara_megatron.conversion.verify import Thresholds, failed_checks, verify_conversion

        result = verify_conversion(args.hf_dir, args.megatron_dir, seq_len=args.seq_len,
                                   batch=args.batch, seed=args.seed)
        print(json.dumps(result), flush=True)
        failed = failed_checks(result, Thresholds(args.max_abs_diff, args.min_argmax_agreement,
                                                  args.min_cosine))
        if failed:
            print(f"{tool}: the models differ: {'; '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    except Exception as e:  # noqa: BLE001 - bad input (ConversionError, the architecture or
        # layout), a damaged checkpoint, a full disk: one line; anything else raises
        return report_user_error(tool, e, getattr(args, "out", None))


if __name__ == "__main__":  # the guard matters: megatron's checkpoint writer spawns a helper
    sys.exit(main())
