"""SARA training on gloo: JS falls, λ_JS = 0 is the plain run, micro-batch invariance, kill/resume."""

import json
import math
import signal
import subprocess
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import launch



STEPS = 24


def _base_overrides(data, **extra):
    values = {
        "model.preset": "qwen3_moe_tiny",
        "model.checkpoint": data["checkpoint"],
        "data.shards_dir": data["shards"],
        "data.prior_store": data["priors"],
        "data.seq_length": 64,
        "data.micro_batch_size": 4,
        "data.global_batch_size": 16,
        "sara.layers": "all",
        "optim.lr": 1e-3,
        "optim.train_steps": STEPS,
        "logging.log_interval": 1,
    }
    values.update(extra)
    out = []
    for key, value in values.items():
        if value is None:
            value = "null"
        out += ["--set", f"{key}={value}"]
    return out


def _read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _train(torchrun, data, tmp_path, name, nproc=2, **overrides):
    log = tmp_path / f"{name}.jsonl"
    torchrun("train", *_base_overrides(data, **{"logging.json_log": log, **overrides}),
             nproc=nproc)
    return _read_log(log)


def _js_falls(records):
    first = sum(r["js"] for r in records[:4]) / 4
    last = sum(r["js"] for r in records[-4:]) / 4
    assert all(torch.isfinite(torch.tensor(r["ce"])) for r in records)
    assert last < 0.6 * first, (first, last)


# Many runs of one world size train in one torchrun launch (tests/workers/training_runs.py: a
# fresh Trainer per run, the processes and their imports start once); each test reads its runs.
RUNS_WORKER = "tests/workers/training_runs.py"
EP2 = {"parallel.ep": 2}
# LoRA on attention and experts with the router trained (docs/peft.md).
LORA = {"peft.method": "lora", "peft.rank": 8, "peft.alpha": 16}
# Resume tests: saved at one layout (stopped after stop_at steps), resumed at another.
RESUMES = {
    "moved": dict(steps=6, stop_at=4, saved_at={"parallel.pp": 2}, resumed_at={"parallel.tp": 2}),
    "vpp": dict(steps=4, stop_at=2, saved_at={"parallel.pp": 2, "parallel.vpp": 2},
                resumed_at={"parallel.pp": 2}),
}
LAYOUT_STEPS = 4
TWO_RANK_LAYOUTS = {"tp2": {"parallel.tp": 2}, "cp2": {"parallel.cp": 2}}
# The kill -9 test runs padded and packed (docs/packing.md: whole samples share rows of 128, a
# micro-batch is one row; steps of 8 samples, two micro-batches a rank, keep it cheap); each
# mode's uninterrupted reference is a run of the shared launch.
KILL_STEPS = 8
KILL_MODES = {
    "padded": {},
    "lora": {**LORA, "peft.dropout": 0.1},  # the adapters' dropout draws resume too
    "packed": {"data.packing": "true", "data.seq_length": 128, "data.micro_batch_size": 1,
               "data.global_batch_size": 8},
}


def _case(data, name, max_steps=None, **overrides):
    return {"name": name, "overrides": _config_args(data, **overrides), "max_steps": max_steps}


def _resume_common(name, steps, out):
    return {"optim.train_steps": steps, "logging.json_log": f"{out}/{name}.jsonl",
            "checkpoint.save_dir": f"{out}/{name}-ckpt", "checkpoint.save_interval": 2}


def _two_rank_cases(data):
    """The 2-rank runs of this module that need no process of their own, less `_stack_cases`."""
    cases = [
        _case(data, "sara", **EP2, **{"logging.tensorboard_dir": "{out}/tb"}),
        _case(data, "fft", **EP2, **{"sara.lambda_js": 0}),
        _case(data, "plain", **EP2, **{"sara.lambda_js": 0, "data.prior_store": None}),
        _case(data, "pp2", **{"parallel.pp": 2}),
        _case(data, "sara_lora", **EP2, **LORA),
        _case(data, "fft_lora", **EP2, **LORA, **{"sara.lambda_js": 0}),
    ]
    for name, r in RESUMES.items():
        cases.append(_case(data, f"{name}_reference", **{"parallel.pp": 2,
                                                         "optim.train_steps": r["steps"]}))
        cases.append(_case(data, f"{name}_saved", max_steps=r["stop_at"],
                           **{**r["saved_at"], **_resume_common(name, r["steps"], "{out}")}))
    return cases


def _stack_cases(data):
    """The 2-rank runs of the tests marked `stack` (the kill -9 references, TP=2 and CP=2), in a
    launch of their own so that `make test-latest` starts only these."""
    cases = [_case(data, f"kill_reference_{mode}", **EP2, **overrides,
                   **{"optim.train_steps": KILL_STEPS})
             for mode, overrides in KILL_MODES.items()]
    for layout, sizes in TWO_RANK_LAYOUTS.items():
        cases.append(_case(data, layout, **{**sizes, "optim.train_steps": LAYOUT_STEPS}))
    return cases


@pytest.fixture(scope="module")
def two_rank_runs(torchrun_cases, sara_data):
    # 10 runs (LoRA-SARA and its λ_JS = 0 twin included) on a shared 2-core machine.
    return torchrun_cases(RUNS_WORKER, "--cases", json.dumps(_two_rank_cases(sara_data)),
                          timeout=1200)


@pytest.fixture(scope="module")
def stack_runs(torchrun_cases, sara_data):
    return torchrun_cases(RUNS_WORKER, "--cases", json.dumps(_stack_cases(sara_data)),
                          timeout=900)


@pytest.fixture(scope="module")
def resumed_runs(torchrun_cases, sara_data, two_rank_runs):
    """The resumed halves of RESUMES, in a launch of their own: they start in fresh processes
    from what the saving runs left on disk."""
    for name in RESUMES:
        two_rank_runs.result(f"{name}_saved")  # fails the test here if the save did not happen
    out = two_rank_runs.out_dir
    cases = [_case(sara_data, f"{name}_resumed",
                   **{**r["resumed_at"], **_resume_common(name, r["steps"], out)})
             for name, r in RESUMES.items()]
    return torchrun_cases(RUNS_WORKER, "--cases", json.dumps(cases))


def test_sara_ep2_js_falls_and_lambda_zero_is_the_plain_run(two_rank_runs):
    sara = two_rank_runs.result("sara")["records"]
    assert [r["step"] for r in sara] == list(range(1, STEPS + 1))
    _js_falls(sara)
    assert sorted(k for k in sara[0] if k.startswith("js_layer/")) == [f"js_layer/{i}" for i in range(4)]
    # TensorBoard holds the same per-step scalars as the JSON log (read back with its own reader).
    events = EventAccumulator(str(two_rank_runs.out_dir / "tb"))
    events.Reload()
    for key in ("ce", "lb", "js", "lr", "grad_norm", "tokens_per_s", "js_layer/0", "js_layer/3"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [r["step"] for r in sara], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in sara], rel=1e-6), key

    fft = two_rank_runs.result("fft")["records"]
    plain = two_rank_runs.result("plain")["records"]
    # λ_JS = 0 with priors runs the SARA code path; without priors the observer is not there.
    assert len(fft) == len(plain) == STEPS
    for a, b in zip(fft, plain):
        for key in ("ce", "lb", "grad_norm"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert plain[0]["js"] == 0.0 and fft[0]["js"] > 0.0
    # SARA ends below FFT on the quantity it optimises.
    assert sum(r["js"] for r in sara[-4:]) < sum(r["js"] for r in fft[-4:])


def test_sara_with_lora_lowers_js_as_full_sara_does(two_rank_runs):
    """SARA with LoRA adapters and the router trained, on the same data and steps as full SARA
    (EP=2): it ends below its λ_JS = 0 twin on JS as full SARA ends below FFT, by a clear margin,
    and not far above full SARA. (Fine-tuning moves the routing away from the anchors' and JS
    rises; SARA pulls it back. With B = 0 the first step is the base model's, as in full SARA.)"""
    full = two_rank_runs.result("sara")["records"]
    lora = two_rank_runs.result("sara_lora")["records"]
    fft_lora = two_rank_runs.result("fft_lora")["records"]
    assert len(lora) == len(fft_lora) == STEPS
    assert all(math.isfinite(r["ce"]) for r in lora)
    assert lora[0]["js"] == pytest.approx(full[0]["js"], rel=1e-5)
    last = lambda records: sum(r["js"] for r in records[-4:]) / 4  # noqa: E731
    # Measured on the CPU: LoRA-SARA 1.2e-4, its λ_JS = 0 twin 3.3e-4, full SARA 1.75e-4.
    assert last(lora) < 0.6 * last(fft_lora), (last(lora), last(fft_lora))
    assert last(lora) < 2 * last(full), (last(lora), last(full))


def test_sara_pp2_js_falls(two_rank_runs):
    records = two_rank_runs.result("pp2")["records"]
    _js_falls(records)


def test_two_microbatches_of_one_equal_one_of_two(single_rank, sara_data):
    """Same global batch cut two ways: gradients (not only Adam's sign-like first update) agree.

    CE and the SARA term are exact under any split. Megatron's load-balancing loss is a statistic
    of each micro-batch's tokens (a product of per-expert fractions), so it legitimately differs
    between splits; it is switched off here to test the rest exactly.
    """
    from sara_megatron.training import Trainer, load_train_config

    def one_step(micro_batch):
        overrides = [a for a in _base_overrides(sara_data, **{
            "data.micro_batch_size": micro_batch, "data.global_batch_size": 2,
            "optim.train_steps": 1, "sara.lambda_js": 1.5, "model.moe_aux_loss_coeff": 0.0,
        }) if a != "--set"]
        trainer = Trainer(load_train_config(None, overrides))
        record = trainer.train_step()
        grads = {n: p.main_grad.detach().clone()
                 for n, p in trainer.chunks[0].module.named_parameters()}
        return record, grads

    rec1, grads1 = one_step(1)
    rec2, grads2 = one_step(2)
    assert rec1.ce == pytest.approx(rec2.ce, rel=1e-6)
    assert rec1.js == pytest.approx(rec2.js, rel=1e-5)
    assert rec1.grad_norm == pytest.approx(rec2.grad_norm, rel=1e-5)
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.stack
@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", KILL_MODES)
def test_kill_and_resume_follows_the_same_losses(torchrun, stack_runs, sara_data, tmp_path,
                                                 mode):
    """The killed run and its resume are processes of their own (a real kill -9, a real restart);
    the uninterrupted reference is a run of the shared launch. Padded, packed (data.packing: the
    resumed run's steps must pack the same samples into the same rows) and LoRA (the base from
    model.checkpoint, adapters, router, optimizer state and the adapters' dropout draws from the
    run's checkpoint)."""
    steps = KILL_STEPS
    full = stack_runs.result(f"kill_reference_{mode}")["records"]
    assert [r["step"] for r in full] == list(range(1, steps + 1))

    log = tmp_path / "killed.jsonl"
    save_dir = tmp_path / "ckpt"
    args = _base_overrides(sara_data, **{
        "parallel.ep": 2, **KILL_MODES[mode], "optim.train_steps": steps, "logging.json_log": log,
        "checkpoint.save_dir": save_dir, "checkpoint.save_interval": 2,
    })
    cmd = launch.tool("train", *args, nproc=2)
    env = launch.environment()
    output = tmp_path / "killed.out"
    with open(output, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(_read_log(log)) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    # kill -9 every process of the run: torchrun starts its workers in sessions of their own.
    import psutil

    victims = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    killed = _read_log(log)
    assert 5 <= len(killed) < steps
    # The run packed (or did not) as its mode says: rank 0 logs the fill rate of a packed run.
    assert ("data.packing: fill rate" in output.read_text(errors="replace")) == (mode == "packed")

    latest = int((save_dir / "latest_checkpointed_iteration.txt").read_text())
    assert latest in (2, 4, 6)
    torchrun("train", *args)  # same command: resumes from the latest checkpoint
    # The resumed run replays the steps after the checkpoint and replaces what the killed one
    # logged of them: every step once.
    logged = _read_log(log)
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    assert logged[:latest] == killed[:latest]
    by_step = {r["step"]: r for r in full}
    for r in killed + logged:
        for key in ("ce", "lb", "js", "grad_norm", "lr"):
            assert r[key] == by_step[r["step"]][key], (r["step"], key)


def _assert_resumed_run_follows(two_rank_runs, resumed_runs, name):
    """A run stopped after `stop_at` steps at layout `saved_at` and resumed at `resumed_at` (in a
    fresh process) logs steps 1..steps, each as an uninterrupted PP=2 run's up to the roundings
    another layout changes: the order of floating-point sums; JS (~4e-4 here) is a difference of
    near-equal distributions and amplifies those roundings the most."""
    steps = RESUMES[name]["steps"]
    reference = two_rank_runs.result(f"{name}_reference")["records"]
    assert two_rank_runs.result(f"{name}_saved")["final_iteration"] == RESUMES[name]["stop_at"]
    records = resumed_runs.result(f"{name}_resumed")["records"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    by_step = {r["step"]: r for r in reference}
    for r in records:
        for key, rel in (("ce", 1e-5), ("grad_norm", 1e-5), ("lr", 1e-9), ("js", 1e-4)):
            assert r[key] == pytest.approx(by_step[r["step"]][key], rel=rel), (r["step"], key)


def test_resume_at_another_layout(two_rank_runs, resumed_runs):
    """Saved at PP=2, resumed at TP=2 with sequence parallel: the run goes on where it was."""
    _assert_resumed_run_follows(two_rank_runs, resumed_runs, "moved")


def test_virtual_pipeline_trains_saves_and_resumes(two_rank_runs, resumed_runs):
    """PP=2 × VPP=2 (one layer per model chunk) starts from a converted checkpoint, saves, and
    resumes without virtual pipeline, following the plain PP=2 run. The chunks of a rank name
    their layers alike (decoder.layers.0. ...): merged into one dict, the save lost a chunk's
    tensors and crashed, and a load could not start."""
    _assert_resumed_run_follows(two_rank_runs, resumed_runs, "vpp")


@pytest.mark.stack
def test_sequence_and_context_parallel_follow_the_single_rank_run(torchrun, stack_runs,
                                                                  single_rank, sara_data,
                                                                  tmp_path):
    """TP=2 with sequence parallel and CP=2 (each rank holds two of four chunks of every sequence)
    train like one rank: CE, load balancing, the SARA term and the gradients are each counted once
    over the ranks that split a micro-batch's tokens. (megatron-core 0.16.1 alone scales the
    load-balancing gradient by 1/(TP·CP) here; see ObservedTopKRouter.) TP=2 with PP=2: the
    second stage gets its sequence-parallel piece of the padding mask (GPTModel cuts it only on
    the first)."""
    from sara_megatron.training import load_train_config, train

    steps = LAYOUT_STEPS
    # The single-rank run in this process (one rank needs no launch).
    log = tmp_path / "single.jsonl"
    train(load_train_config(None, _config_args(sara_data, **{"optim.train_steps": steps,
                                                             "logging.json_log": log})))
    single = _read_log(log)
    splits = {layout: stack_runs.result(layout)["records"] for layout in TWO_RANK_LAYOUTS}
    # TP=2 × PP=2 needs 4 ranks: a launch of its own.
    splits["tp2_pp2"] = _train(torchrun, sara_data, tmp_path, "tp2_pp2", nproc=4,
                               **{"parallel.tp": 2, "parallel.pp": 2, "optim.train_steps": steps})
    for layout, split in splits.items():
        assert [r["step"] for r in split] == list(range(1, steps + 1))
        for a, b in zip(single, split):
            # JS (~5e-4 here) is a difference of near-equal distributions: it amplifies the
            # rounding of the split sums the most.
            for key, rel in (("ce", 1e-5), ("lb", 1e-5), ("grad_norm", 1e-5), ("js", 1e-4)):
                assert b[key] == pytest.approx(a[key], rel=rel), (layout, a["step"], key)


def test_warmup_cosine_schedule_and_gradient_clipping(single_rank, sara_data):
    """The lr each step uses follows linear warmup then cosine decay to min_lr (Megatron's
    convention: step k uses the rate after k − 1 scheduler steps), and the gradients the optimizer
    applies are clipped to optim.clip_grad when their norm is above it."""
    import math

    from sara_megatron.training import Trainer, load_train_config

    steps, warmup, peak, floor, clip = 8, 2, 1e-3, 1e-4, 0.05
    overrides = [a for a in _base_overrides(sara_data, **{
        "data.micro_batch_size": 2, "data.global_batch_size": 2, "optim.train_steps": steps,
        "optim.lr": peak, "optim.min_lr": floor, "optim.warmup_fraction": warmup / steps,
        "optim.clip_grad": clip,
    }) if a != "--set"]
    trainer = Trainer(load_train_config(None, overrides))

    def expected_lr(done):
        if done <= warmup:
            return peak * done / warmup
        progress = (done - warmup) / (steps - warmup)
        return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)

    for step in range(1, steps + 1):
        record = trainer.train_step()
        assert record.lr == pytest.approx(expected_lr(step - 1), rel=1e-9, abs=1e-15), step
        applied = torch.sqrt(sum(
            (p.main_grad.double() ** 2).sum() for p in trainer.chunks[0].module.parameters()
        ))
        assert record.grad_norm > clip  # this tiny model's gradients are far above the limit
        assert float(applied) == pytest.approx(clip, rel=1e-4), step


def _mock_trainer(**overrides):
    """A one-process Trainer on the tiny model (random init from the seed), fed by the test."""
    from sara_megatron.training import Trainer, load_train_config

    values = {"model.preset": "qwen3_moe_tiny", "data.mock": True, "sara.layers": "all",
              "optim.train_steps": 1, "data.micro_batch_size": 4, "data.global_batch_size": 8,
              **overrides}
    return Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))


def _padded_microbatches(seq_length, num_layers, num_experts):
    """Two micro-batches of the same real rows (of unequal lengths), right-padded to seq_length."""
    import numpy as np

    from sara_megatron.data.batch import pack_tokens
    from sara_megatron.data.sara_dataset import SaraMicroBatch

    batches = []
    for index in range(2):
        rng = np.random.default_rng([11, index])
        rows = [rng.integers(1, 200, size=n, dtype=np.int64) for n in (32, 19, 27, 8)]
        packed = pack_tokens(rows, [6, 4, 10, 3], seq_length=seq_length)
        draws = rng.exponential(size=(num_layers, 4, num_experts))
        priors = torch.from_numpy((draws / draws.sum(-1, keepdims=True)).astype(np.float32))
        batches.append(SaraMicroBatch(
            packed.tokens, packed.labels, packed.loss_mask, packed.padding_mask,
            [f"{index}-{row}" for row in range(4)], ["hi"] * 4, priors, tuple(range(num_layers)),
        ))
    return batches


def test_padding_is_left_out_of_load_balancing(single_rank):
    """The same real tokens padded to 32 or to 96 positions: megatron's load-balancing loss and
    the gradient it gives the routers are the same (padding is neither in its expert statistics
    nor in its token count), and so is every other gradient (CE and the SARA term)."""

    def step(seq_length, lb_coeff):
        trainer = _mock_trainer(**{"data.seq_length": seq_length, "sara.lambda_js": 1.5,
                                   "model.moe_aux_loss_coeff": lb_coeff, "optim.clip_grad": 0.0})
        arch = trainer.arch
        trainer.batches = iter(_padded_microbatches(seq_length, arch.num_layers, arch.num_experts))
        record = trainer.train_step()
        grads = {n: p.main_grad.detach().clone()
                 for n, p in trainer.chunks[0].module.named_parameters()}
        return record, grads

    runs = {(s, c): step(s, c) for s in (32, 96) for c in (0.0, 0.01)}
    short, long = runs[32, 0.01][0], runs[96, 0.01][0]
    assert short.lb == pytest.approx(long.lb, rel=1e-6) and short.lb > 0
    assert short.ce == pytest.approx(long.ce, rel=1e-6)
    assert short.js == pytest.approx(long.js, rel=1e-5)
    routers = [n for n in runs[32, 0.0][1] if "router.weight" in n]
    assert routers
    for name in routers:
        lb_short = runs[32, 0.01][1][name] - runs[32, 0.0][1][name]
        lb_long = runs[96, 0.01][1][name] - runs[96, 0.0][1][name]
        assert lb_short.abs().max() > 0
        torch.testing.assert_close(lb_long, lb_short, rtol=1e-4, atol=1e-4 * float(lb_short.abs().max()),
                                   msg=name)
    for name, grad in runs[32, 0.0][1].items():
        torch.testing.assert_close(runs[96, 0.0][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _config_args(data, **extra):
    return [a for a in _base_overrides(data, **extra) if a != "--set"]


def test_resume_refuses_a_changed_schedule_or_data_stream(single_rank, sara_data, tmp_path,
                                                          caplog):
    """A resumed run follows the checkpoint's LR schedule and sample order or says why it
    cannot: a changed lr / schedule length / Adam setting is refused unless
    optim.override_scheduler is set (then the config's schedule runs from the saved step); a
    changed seed, shuffle or language set (consumed_samples would index another sample order) is
    refused, as is another kind of optimizer and a run folder given as model.checkpoint; another
    global batch resumes; another SARA term is a warning."""
    import logging

    from sara_megatron.training import Trainer, load_train_config

    common = {"data.micro_batch_size": 2, "data.global_batch_size": 2, "optim.train_steps": 4,
              "optim.warmup_fraction": 0.0, "checkpoint.save_dir": tmp_path / "ckpt",
              "checkpoint.save_interval": 1}

    def trainer(**changes):
        return Trainer(load_train_config(None, _config_args(sara_data, **{**common, **changes})))

    assert trainer().run(max_steps=1).final_iteration == 1

    with pytest.raises(ValueError, match=r"optim\.lr: checkpoint 0\.001, config 0\.0001.*"
                                         r"optim\.override_scheduler=true"):
        trainer(**{"optim.lr": 1e-4})
    with pytest.raises(ValueError, match=r"schedule length in steps.*checkpoint 4, config 8.*"
                                         r"adam_beta2.*checkpoint \(0\.9, 0\.999, 1e-08\), "
                                         r"config \(0\.9, 0\.95, 1e-08\)"):
        trainer(**{"optim.train_steps": 8, "optim.adam_beta2": 0.95})
    with pytest.raises(ValueError, match=r"data stream differs.*seed: checkpoint 1234, config 99.*"
                                         r"shuffle: checkpoint True, config False.*"
                                         r"languages \(resolved\): checkpoint \['hi', 'sw'\], "
                                         r"config \['hi'\].*consumed_samples \(2\)"):
        trainer(**{"seed": 99, "data.shuffle": False, "data.languages": "[hi]"})
    with pytest.raises(RuntimeError, match=r"holds the state of DistributedOptimizer.*builds "
                                           r"FP32Optimizer.*optim.distributed_optimizer"):
        trainer(**{"optim.distributed_optimizer": False})
    with pytest.raises(ValueError, match=r"is a training run's folder: name one of its iteration "
                                         r"folders .*iter_0000001"):
        trainer(**{"checkpoint.save_dir": tmp_path / "other", "model.checkpoint": tmp_path / "ckpt"})
    # The global batch sets how many positions of the sample order a step takes, not which
    # sample sits at each: the run goes on from the same position.
    wider = trainer(**{"data.global_batch_size": 4})
    assert (wider.iteration, wider.consumed_samples) == (1, 2)
    with caplog.at_level(logging.WARNING, logger="sara_megatron.training.trainer"):
        trainer(**{"sara.lambda_js": 0.5})
    assert "with another SARA term: checkpoint λ_JS 1.5 on layers [0, 1, 2, 3], config λ_JS 0.5" \
        in caplog.text

    resumed = trainer(**{"optim.lr": 1e-4, "optim.override_scheduler": True})
    assert resumed.iteration == 1
    record = resumed.train_step()  # step 2 uses the rate after one scheduler step, of 4
    assert record.lr == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)) * 1e-4, rel=1e-9)
    assert {g["max_lr"] for g in resumed.optimizer.param_groups} == {1e-4}


def test_seq_length_that_cuts_samples_is_refused_with_priors(single_rank, sara_data, caplog):
    """data.seq_length below the samples' lengths cuts them while the anchor priors came from
    whole sequences: refused when the SARA term reads the priors, a warning otherwise."""
    import logging

    from sara_megatron.training import Trainer, load_train_config

    short = {"data.seq_length": 16, "data.micro_batch_size": 2, "data.global_batch_size": 2}
    with pytest.raises(ValueError, match=r"data\.seq_length=16 cuts \d+ of \d+ training samples.*"
                                         r"extracted on whole sequences"):
        Trainer(load_train_config(None, _config_args(sara_data, **short)))
    with caplog.at_level(logging.WARNING, logger="sara_megatron.training.trainer"):
        Trainer(load_train_config(None, _config_args(sara_data, **short, **{"sara.lambda_js": 0})))
    assert "data.seq_length=16 cuts" in caplog.text


def test_a_checkpoint_of_another_configuration_is_refused(single_rank, sara_data, tmp_path):
    """model.preset must be the configuration model.checkpoint records (its conversion record):
    a changed norm epsilon loads into the same shapes and trained on silently."""
    import dataclasses
    import shutil

    from sara_megatron.checkpointing.record import architecture_record, write_metadata
    from sara_megatron.models.architecture import get_preset
    from sara_megatron.training import Trainer, load_train_config

    checkpoint = tmp_path / "recorded"
    shutil.copytree(sara_data["checkpoint"], checkpoint)
    made_for = dataclasses.replace(get_preset("qwen3_moe_tiny"), norm_epsilon=1e-2)
    write_metadata(str(checkpoint), {"architecture": architecture_record(made_for)})
    with pytest.raises(ValueError, match=r"another model configuration \(norm_epsilon: "
                                         r"checkpoint 0\.01, model 1e-06\)"):
        Trainer(load_train_config(None, _config_args(sara_data, **{"model.checkpoint": checkpoint})))


def test_seq_length_across_the_longrope_switch_is_refused_with_priors(single_rank, tmp_path):
    """Shards below the tiny Phi's longrope switch (64 positions) give priors under the short
    factors; data.seq_length past the switch would train every batch under the long ones."""
    from sara_megatron.checkpointing import save_model_weights
    from sara_megatron.data.corpus_sharding import ShardingConfig, shard_corpus
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus
    from sara_megatron.data.token_shards import TokenShards
    from sara_megatron.models.architecture import get_preset
    from sara_megatron.models.builder import build_model
    from sara_megatron.priors import PriorStoreMetadata, PriorStoreWriter, model_fingerprint
    from sara_megatron.priors.extraction import ExtractionSettings, extract_priors
    from sara_megatron.training import Trainer, load_train_config

    paths = write_synthetic_corpus(tmp_path / "corpus", 8, languages=("en", "hi"), max_words=12)
    build_local_tokenizer(corpus_texts(paths), tmp_path / "tokenizer")
    shard_corpus(ShardingConfig((str(tmp_path / "corpus"),), str(tmp_path / "shards"),
                                str(tmp_path / "tokenizer"), seq_length=48, shard_size=8))
    shards = TokenShards(tmp_path / "shards")
    assert max(s.meta.token_count for s in shards.samples("en")) <= 48
    arch = get_preset("phi35_moe_tiny")
    assert arch.longrope.original_max_position_embeddings == 64
    torch.manual_seed(0)
    model = build_model(arch)
    save_model_weights(model, tmp_path / "ckpt")
    meta = PriorStoreMetadata(layers=(0, 1, 2, 3), num_experts=arch.num_experts, dtype="fp32",
                              anchor_language="en",
                              model_fingerprint=model_fingerprint(tmp_path / "ckpt"),
                              corpus_fingerprint=shards.language_fingerprint("en"))
    extract_priors(model.eval(), shards, PriorStoreWriter(tmp_path / "priors", meta),
                   ExtractionSettings(layers=meta.layers, micro_batch_size=4))

    def trainer(seq_length, lambda_js=1.5):
        values = {"model.preset": "phi35_moe_tiny", "model.checkpoint": tmp_path / "ckpt",
                  "data.shards_dir": tmp_path / "shards", "data.prior_store": tmp_path / "priors",
                  "data.seq_length": seq_length, "data.micro_batch_size": 2,
                  "data.global_batch_size": 2, "sara.layers": "all", "sara.lambda_js": lambda_js,
                  "optim.train_steps": 1}
        return Trainer(load_train_config(None, [f"{k}={v}" for k, v in values.items()]))

    with pytest.raises(ValueError, match=r"data\.seq_length=100 and the shards' seq_length 48 lie "
                                         r"on either side of the longrope switch at 64"):
        trainer(100)
    trainer(60)  # the same side: the priors' rope factors
    trainer(100, lambda_js=0)  # no priors read
