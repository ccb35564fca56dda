"""The run's checks before anything is built: a missing input path is named with its key before
the model is built, and every problem found is named in one error (training/preflight.py)."""

import subprocess

import pytest

import launch



def _mock_settings(**extra):
    values = {"model.preset": "qwen3_moe_tiny", "data.mock": True, "sara.layers": "all",
              "data.seq_length": 32, "optim.train_steps": 2, "data.micro_batch_size": 2,
              "data.global_batch_size": 4, **extra}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if the run builds a model."""
    import sara_megatron.training.state as state

    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("a model was built")

    monkeypatch.setattr(state, "build_model", refuse)
    yield
    assert not built


def test_a_missing_checkpoint_is_named_before_the_model_is_built(single_rank, tmp_path,
                                                                 no_model_built):
    """model.checkpoint=nope is refused before the model is built, not inside megatron's
    dist_checkpointing with its own traceback."""
    from sara_megatron.training import Trainer, load_train_config
    from sara_megatron.training.preflight import PreflightError

    nope = tmp_path / "nope"
    with pytest.raises(PreflightError, match=rf"^model\.checkpoint {nope}: no such folder "
                                             r"\(a converted checkpoint"):
        Trainer(load_train_config(None, _mock_settings(**{"model.checkpoint": nope})))


def test_every_problem_is_named_in_one_error(single_rank, tmp_path, no_model_built):
    from sara_megatron.training import Trainer, load_train_config
    from sara_megatron.training.preflight import PreflightError

    (tmp_path / "a_file").write_text("")
    settings = {"model.checkpoint": tmp_path / "a_file", "data.shards_dir": tmp_path / "shards",
                "data.prior_store": tmp_path / "priors", "sara.first_layer": 2,
                "sara.last_layer": 9, "data.micro_batch_size": 2,
                "data.global_batch_size": 3, "optim.train_steps": 4,
                "optim.warmup_fraction": 1.0}
    with pytest.raises(PreflightError) as err:
        Trainer(load_train_config(None, [f"{k}={v}" for k, v in settings.items()]))
    problems = err.value.problems
    assert str(err.value).splitlines()[0] == f"{len(problems)} problems:"
    expected = [f"model.checkpoint {tmp_path}/a_file: not a folder",
                f"data.shards_dir {tmp_path}/shards: no such folder",
                f"data.prior_store {tmp_path}/priors: no such folder",
                "global batch 3 is not a multiple of micro batch × data parallel = 2 × 1",
                "alignment range 2..9 does not fit a model of 4 layers",
                "optim.warmup_fraction=1.0 makes a warmup of 4 steps, the whole schedule of 4"]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)
        assert f"  - {problem}" in str(err.value)


@pytest.mark.multiprocess
@pytest.mark.parametrize("debug", [False, True])
def test_train_py_prints_a_missing_path_as_one_line(tmp_path, debug):
    """One line and exit 2; --debug adds the traceback above it."""
    args = [a for value in _mock_settings(**{"model.checkpoint": "nope"}) for a in ("--set", value)]
    env = launch.environment()
    proc = subprocess.run([*launch.tool("train"), *args,
                           *(["--debug"] if debug else [])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: model.checkpoint nope: no such folder"), proc.stderr[-3000:]
    assert ("Traceback" in proc.stderr) == debug


def test_combinations_not_built_are_refused_in_one_line_each(single_rank, tmp_path,
                                                             no_model_built):
    """AES with the alltoall dispatcher (megatron's GPU default) and packing with Transformer
    Engine are refused before anything is built, one line each naming the feature and the
    setting to change, beside the other problems."""
    from sara_megatron.training import Trainer, load_train_config
    from sara_megatron.training.preflight import PreflightError

    with pytest.raises(PreflightError) as err:
        Trainer(load_train_config(None, _mock_settings(**{
            "sara.objective": "aes", "model.token_dispatcher": "alltoall"})))
    assert err.value.problems == [
        "sara.objective aes with the alltoall token dispatcher is not supported (its "
        "orthogonality term reads the allgather dispatcher's tokens): set "
        "model.token_dispatcher: allgather"]

    settings = _mock_settings(**{"data.mock": False, "data.shards_dir": tmp_path / "shards",
                                 "data.packing": True, "model.use_te": True})
    with pytest.raises(PreflightError) as err:
        Trainer(load_train_config(None, settings))
    assert ("data.packing with Transformer Engine is not supported: set data.packing=false, or "
            "model.use_te=false (the local spec)") in err.value.problems
    assert any(p.startswith(f"data.shards_dir {tmp_path / 'shards'}: no such folder")
               for p in err.value.problems)
    assert all("\n" not in p and "issue" not in p for p in err.value.problems)
