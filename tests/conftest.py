import os
import subprocess
import sys
from pathlib import Path

import pytest

from sara_megatron.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Verification stamps (sara_megatron/data/file_stamps.py) go to a folder of this run, not the
    user's cache; tool subprocesses inherit it."""
    if "SARA_VERIFY_CACHE" not in os.environ:
        import tempfile

        os.environ["SARA_VERIFY_CACHE"] = tempfile.mkdtemp(prefix="sara-verify-")


@pytest.fixture
def torchrun(tmp_path):
    """Run a worker script under torchrun with N local processes; fail with its output."""

    def run(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(nproc), "--master-port", str(free_port()),
            str(REPO / script), *args,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            pytest.fail(
                f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )

    return run


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state on a one-process gloo group (TP=EP=PP=1), CPU compat applied."""
    from sara_megatron.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig(), seed=1234)
    yield


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


def _run_checked(cmd, cwd, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


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
    _run_checked([py, str(REPO / "tools/shard_corpus.py"), "--corpus", str(root / "corpus"),
                  "--tokenizer", str(root / "tokenizer"), "--output", str(root / "shards"),
                  "--anchor-language", "en", "--seq-length", "64"], cwd=root)
    (root / "init_checkpoint.py").write_text(_INIT_CHECKPOINT)
    _run_checked([py, str(root / "init_checkpoint.py"), "qwen3_moe_tiny", str(root / "init"), "7"],
                 cwd=root)
    _run_checked([py, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                  str(free_port()), str(REPO / "tools/extract_priors.py"), "--shards",
                  str(root / "shards"), "--checkpoint", str(root / "init"), "--model",
                  "qwen3_moe_tiny", "--output", str(root / "priors")], cwd=root)
    return {"root": root, "shards": root / "shards", "checkpoint": root / "init",
            "priors": root / "priors"}
