import os
import sys

import launch
import pytest
from launch import REPO

# Fixtures whose tests start processes: marked `multiprocess` (and `slow`) by the hook below.
_PROCESS_FIXTURES = {"torchrun": ("multiprocess", "slow"), "torchrun_cases": ("multiprocess", "slow"),
                     "sara_data": ("multiprocess", "slow")}


def pytest_configure(config):
    """Verification stamps (sara_megatron/file_stamps.py) go to a folder of this run, not the
    user's cache; tool subprocesses inherit it."""
    if "SARA_VERIFY_CACHE" not in os.environ:
        import tempfile

        os.environ["SARA_VERIFY_CACHE"] = tempfile.mkdtemp(prefix="sara-verify-")


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a process-starting fixture, so `-m "not multiprocess"` leaves it
    out without each test saying so."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        marks = {mark for name in fixtures for mark in _PROCESS_FIXTURES.get(name, ())}
        for mark in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture
def torchrun(tmp_path):
    """Run a worker script (a path) or a tool (its name, e.g. "train") under torchrun with N
    local processes; fail with its output."""

    def run(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
        proc = launch.run(launch.torchrun_command(script, *args, nproc=nproc), tmp_path, timeout)
        if proc.returncode != 0:
            pytest.fail(
                f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )

    return run


@pytest.fixture(scope="module")
def torchrun_cases(tmp_path_factory):
    """Launch a many-case worker once per distinct set of arguments in this module (at the first
    test that asks) and return its `launch.CaseLaunch`; later tests of the module reuse it."""
    launches = {}

    def get(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> launch.CaseLaunch:
        key = (script, args, nproc)
        if key not in launches:
            launches[key] = launch.CaseLaunch(script, *args, nproc=nproc, timeout=timeout,
                                              out_dir=tmp_path_factory.mktemp("cases"))
        return launches[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def early_launches(request, tmp_path_factory):
    """{fixture name: launch.Background} of the launches test modules registered with
    `launch.early_launch` whose fixture a selected test uses, started at the session's first
    test; the rest of the session runs beside them (docs/testing.md)."""
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    started = {}
    for name in sorted(used & set(launch.EARLY_LAUNCHES)):
        folder = tmp_path_factory.mktemp(name)
        started[name] = launch.Background(folder=folder, **launch.EARLY_LAUNCHES[name](folder))
    yield started
    for background in started.values():
        background.stop()


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state on a one-process gloo group (TP=EP=PP=1), CPU compat applied."""
    from sara_megatron.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    yield


@pytest.fixture(autouse=True, scope="module")
def process_groups_end_with_the_module():
    """Each module's process groups are destroyed when it ends. Megatron's
    `destroy_model_parallel` only drops its references: the gloo groups stay registered, each
    with three threads, so a session that re-initialises parallel state module after module
    piled up hundreds of groups (579 threads by 12% of the suite) whose threads took CPU from
    every later test."""
    yield
    import torch.distributed as dist

    from sara_megatron.distributed import destroy_distributed

    if dist.is_available() and dist.is_initialized():
        destroy_distributed()


@pytest.fixture(autouse=True, scope="module")
def fresh_aux_loss_scale():
    """A plain backward through a router leaves megatron's aux-loss scale as a 0-d tensor, which
    megatron's schedules then fail to copy their [1]-shaped scale into: each test module starts
    without that process-wide state."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def pytest_sessionfinish(session, exitstatus):
    from sara_megatron.distributed import destroy_distributed

    try:
        destroy_distributed()
    except Exception:  # noqa: BLE001 - a failed teardown must not mask the test result
        pass


_INIT_CHECKPOINT = """
import sys
from sara_megatron.checkpointing import save_model_weights
from sara_megatron.distributed import ParallelConfig, destroy_distributed, initialize_distributed
from sara_megatron.models.architecture import get_preset
from sara_megatron.models.builder import build_model
if __name__ == "__main__":
    initialize_distributed(ParallelConfig(), seed=int(sys.argv[3]))
    save_model_weights(build_model(get_preset(sys.argv[1])), sys.argv[2])
    destroy_distributed()
"""


@pytest.fixture(scope="session")
def sara_data(tmp_path_factory):
    """A small SARA setup made the way users make one: a synthetic parallel corpus (en anchor,
    hi and sw targets), a local tokenizer, token shards, a random tiny Qwen3-MoE checkpoint and
    its anchor priors. Returns a dict of paths."""
    from sara_megatron.data.local_tokenizer import build_local_tokenizer
    from sara_megatron.data.synthetic_corpus import corpus_texts, write_synthetic_corpus

    root = tmp_path_factory.mktemp("sara_data")
    paths = write_synthetic_corpus(root / "corpus", 64, languages=("en", "hi", "sw"), max_words=24)
    build_local_tokenizer(corpus_texts(paths), root / "tokenizer", vocab_size=200)
    py = sys.executable
    launch.run_checked(launch.tool("shard_corpus", "--corpus", root / "corpus", "--tokenizer",
                                   root / "tokenizer", "--output", root / "shards",
                                   "--anchor-language", "en", "--seq-length", "64"), cwd=root)
    (root / "init_checkpoint.py").write_text(_INIT_CHECKPOINT)
    launch.run_checked([py, str(root / "init_checkpoint.py"), "qwen3_moe_tiny", str(root / "init"),
                        "7"], cwd=root)
    launch.run_checked(launch.tool(
        "extract_priors", "--shards", root / "shards", "--checkpoint", root / "init",
        "--model", "qwen3_moe_tiny", "--output", root / "priors", nproc=1), cwd=root)
    return {"root": root, "shards": root / "shards", "checkpoint": root / "init",
            "priors": root / "priors"}
