"""Real-token throughput of a training step, packed vs padded (benchmark, not a test).

    python benchmarks/bench_packing.py                      # tiny Qwen3-MoE, seq_length 2048, CPU
    python benchmarks/bench_packing.py --length-scale 3     # samples three times as long

One process, the tiny CPU config's model (`examples/tiny_cpu_sara.yaml`: qwen3_moe_tiny, SARA on
all layers, megatron's LB). Each step takes the same global batch of samples both ways and runs
forward and backward of every micro-batch — CE over response tokens, LB over real tokens, SARA
per sample against a random prior — padded (one sample per row of seq_length, as data.packing
false) or packed (data/packing.py). The optimizer step is left out: it costs the same either way.
Prints the median step time, real (non-padding) tokens per second and the fill rates.

Sample lengths: the fixture interactions of tests/fixtures/construction/answers_en.jsonl (GSM8K
and MMLU-ProX prompts with a model's answer), measured in characters and turned into tokens at
4 characters per token (English BPE; the tiny model's local tokenizer is far coarser) plus the
chat template's tokens; each sample draws one of them (times --length-scale). The fixture's answers
are short; --length-scale 3 is closer to full GSM8K solutions (a few hundred tokens).
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import numpy as np
import torch

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "construction",
                       "answers_en.jsonl")
CHARS_PER_TOKEN = 4
TEMPLATE_TOKENS = 10  # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n ... <|im_end|>\n


def fixture_lengths(path: str = FIXTURE) -> list[tuple[int, int]]:
    """(prompt tokens, total tokens) of each fixture interaction (see the module docstring)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            prompt = sum(len(m["content"]) for m in record["messages"]) // CHARS_PER_TOKEN
            answer = len(record.get("output") or "") // CHARS_PER_TOKEN
            out.append((prompt + TEMPLATE_TOKENS - 4, prompt + answer + TEMPLATE_TOKENS))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="qwen3_moe_tiny")
    args = parser.parse_args()
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")

    from sara_megatron.data.batch import pack_tokens
    from sara_megatron.data.packing import fill_rate, pack_rows_tokens, plan_packed_step
    from sara_megatron.distributed import ParallelConfig, initialize_distributed
    from sara_megatron.models.architecture import get_preset
    from sara_megatron.models.builder import ModelOptions, build_model, causal_attention_mask
    from sara_megatron.models.packed_attention import packed_attention_mask, packed_rope
    from sara_megatron.routing import observe_routers, segment_ids_from_padding_mask
    from sara_megatron.sara import SaraRoutingLoss

    initialize_distributed(ParallelConfig(), seed=1234)
    torch.manual_seed(0)
    arch = get_preset(args.preset)
    model = build_model(arch, ModelOptions(seq_length=args.seq_length))
    model.train()
    sara = SaraRoutingLoss(range(arch.num_layers), coeff=1.5)
    s = args.seq_length

    measured = fixture_lengths()
    totals = [n for _, n in measured]
    print(f"fixture interactions: {len(measured)}, tokens min/median/max "
          f"{min(totals)}/{statistics.median(totals)}/{max(totals)} "
          f"({CHARS_PER_TOKEN} chars/token), scaled ×{args.length_scale}")
    rng = np.random.default_rng(0)

    def draw_step():
        picks = rng.integers(0, len(measured), size=args.global_batch)
        prompts = [max(1, int(measured[i][0] * args.length_scale)) for i in picks]
        totals = [max(p + 1, int(measured[i][1] * args.length_scale)) for i, p in zip(picks, prompts)]
        seqs = [rng.integers(1, arch.vocab_size, size=n) for n in totals]
        priors = torch.from_numpy(rng.dirichlet(np.ones(arch.num_experts),
                                                (arch.num_layers, len(seqs)))).float()
        return seqs, prompts, priors

    def run(micro_batches):
        """forward + backward of a step's micro-batches: (seconds, real tokens)."""
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        real = 0
        loss_tokens = sum(float(mb["loss_mask"].sum()) for mb in micro_batches)
        for mb in micro_batches:
            sara.set_batch(mb["priors"], mb["segment_ids"], packed=mb["packed"])
            with observe_routers(model, sara), (packed_rope(model, mb["positions"]) if mb["packed"]
                                         else contextlib.nullcontext()):
                per_token = model(mb["tokens"], mb["positions"], mb["mask"], labels=mb["labels"],
                                  padding_mask=mb["padding_mask"])
            ((per_token.float() * mb["loss_mask"]).sum() / loss_tokens).backward()
            real += int((~mb["padding_mask"]).sum())
        return time.perf_counter() - started, real

    def padded(seqs, prompts, priors):
        out = []
        for start in range(0, len(seqs), args.micro_batch):
            part = slice(start, start + args.micro_batch)
            batch = pack_tokens(seqs[part], prompts[part], seq_length=s)
            b = batch.tokens.shape[0]
            out.append(dict(tokens=batch.tokens, labels=batch.labels, loss_mask=batch.loss_mask,
                            padding_mask=batch.padding_mask, positions=torch.arange(s).expand(b, s),
                            mask=causal_attention_mask(s),
                            segment_ids=segment_ids_from_padding_mask(batch.padding_mask),
                            priors=priors[:, part], packed=False))
        return out

    def packed(seqs, prompts, priors):
        plan = plan_packed_step([len(x) for x in seqs], s, args.micro_batch, 1)
        out = []
        for mb in plan.rank_micro_batches(0):
            rows = [plan.rows[r] if r >= 0 else () for r in mb]
            batch = pack_rows_tokens([[seqs[i] for i in row] for row in rows],
                                     [[prompts[i] for i in row] for row in rows], s)
            order = [i for row in rows for i in row]
            out.append(dict(tokens=batch.tokens, labels=batch.labels, loss_mask=batch.loss_mask,
                            padding_mask=batch.padding_mask, positions=batch.position_ids,
                            mask=packed_attention_mask(batch.segment_ids),
                            segment_ids=batch.segment_ids, priors=priors[:, order], packed=True))
        return out, len(plan.micro_batches) * args.micro_batch

    results = {"padded": [], "packed": []}
    fills = []
    for step in range(args.steps + 1):  # the first step warms up
        seqs, prompts, priors = draw_step()
        packed_batches, rows = packed(seqs, prompts, priors)
        fills.append((fill_rate([len(x) for x in seqs], rows, s),
                      fill_rate([len(x) for x in seqs], len(seqs), s)))
        for name, batches in (("padded", padded(seqs, prompts, priors)), ("packed", packed_batches)):
            seconds, real = run(batches)
            if step:
                results[name].append((seconds, real))
        print(f"step {step}{' (warm-up)' if not step else ''}: packed {rows} rows, "
              f"fill {fills[-1][0]:.1%} packed / {fills[-1][1]:.1%} padded")
    rate = {}
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        tokens = statistics.median(n for _, n in runs)
        rate[name] = tokens / seconds
        print(f"{name}: median step {seconds:.2f} s, {rate[name]:.0f} real tokens/s")
    print(f"packed / padded real-token throughput: {rate['packed'] / rate['padded']:.1f}x "
          f"(seq_length {s}, global batch {args.global_batch}, micro-batch {args.micro_batch} rows,"
          f" {args.preset}, {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
