"""The `Objective` interface from the outside: a toy objective (an L2 penalty on the router
weights, its own module-level class and config section here, nothing of the trainer touched)
trains a step; its gradient is the penalty's and nothing else's, its metric reaches the log, its
section is parsed and checked like the built-in ones, and the built-in objectives are found
through the same registry."""

import json

import pydantic
import pytest
import torch

from sara_megatron.routing.observers import model_routers
from sara_megatron.training.objectives import (
    Objective,
    ObjectiveMetrics,
    objective_class,
    register_objective,
    registered_objectives,
    unregister_objective,
)


class RouterL2Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    coeff: float = 0.0


class RouterL2(Objective):
    """coeff · Σ_layers ‖W_router‖², the mean over the global batch's tokens as every term is."""

    name = "router_l2"
    section = "router_l2"
    Section = RouterL2Section

    def __init__(self, coeff, routers):
        self.coeff, self.routers, self.weight = coeff, routers, None

    @classmethod
    def check_config(cls, cfg):
        if cfg.section("router_l2").coeff < 0:
            raise ValueError("router_l2.coeff must be >= 0")

    @classmethod
    def build(cls, cfg, plan, chunks, model_config, process_groups):
        routers = {r.global_layer_index: r for r in model_routers(chunks)}
        return cls(cfg.section("router_l2").coeff, routers)

    def prepare_step(self, step):
        # megatron divides every gradient by the global batch's loss tokens T once, and the
        # observer runs once per micro-batch: T / micro-batches per call makes the sum coeff·‖W‖²
        self.weight = float(step.loss_tokens) / len(step.microbatches)
        return step.microbatches

    def router_observer(self):
        def observe(layer, logits, padding_mask):
            return self.coeff * self.weight * self.routers[layer].weight.float().pow(2).sum()
        return observe

    def metrics(self, num_layers):
        return ObjectiveMetrics({"router_l2": sum(float(r.weight.detach().float().pow(2).sum())
                                                  for r in self.routers.values())})


@pytest.fixture
def router_l2():
    register_objective(RouterL2)
    yield RouterL2
    unregister_objective(RouterL2.name)


def _overrides(coeff, json_log):
    return ["model.preset=qwen3_moe_tiny", "data.mock=true", "data.seq_length=16",
            "data.micro_batch_size=2", "data.global_batch_size=4", "optim.train_steps=1",
            "optim.clip_grad=0", "sara.layers=all", "sara.objective=router_l2",
            f"router_l2.coeff={coeff}",
            f"logging.json_log={json_log}"]


def _one_step(coeff, json_log):
    from sara_megatron.training import Trainer, load_train_config

    trainer = Trainer(load_train_config(None, _overrides(coeff, json_log)))
    model = trainer.chunks[0].module
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.run()
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    logged = [json.loads(line) for line in open(json_log, encoding="utf-8")]
    return start, grads, logged


def test_a_toy_objective_trains_through_the_interface(single_rank, router_l2, tmp_path):
    coeff = 0.25
    start, with_term, logged = _one_step(coeff, tmp_path / "on.jsonl")
    start_off, without, _ = _one_step(0.0, tmp_path / "off.jsonl")
    routers = [n for n in start if n.endswith("router.weight")]
    assert len(routers) == 4
    for name in start:
        assert torch.equal(start[name], start_off[name]), name  # the same starting weights
        if name in routers:  # d(coeff·‖W‖²)/dW = 2·coeff·W, on top of the CE's and LB's
            torch.testing.assert_close(with_term[name] - without[name], 2 * coeff * start[name],
                                       rtol=1e-4, atol=1e-7, msg=name)
        else:  # the term reaches nothing else
            assert torch.equal(with_term[name], without[name]), name
    (record,) = logged
    assert record["router_l2"] > 0  # its metric, logged with the step, after the update
    assert {"ce", "lb", "js"} <= set(record)


def test_its_section_is_a_config_section(router_l2):
    from sara_megatron.training import load_train_config
    from sara_megatron.training.config import ConfigError

    cfg = load_train_config(None, ["sara.objective=router_l2", "router_l2.coeff=0.5"])
    assert cfg.section("router_l2").coeff == 0.5
    assert cfg.to_dict()["router_l2"] == {"coeff": 0.5}
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) router_l2.cof; known: coeff"):
        load_train_config(None, ["sara.objective=router_l2", "router_l2.cof=1"])
    with pytest.raises(ConfigError, match="router_l2.coeff must be >= 0"):
        load_train_config(None, ["sara.objective=router_l2", "router_l2.coeff=-1"])
    with pytest.raises(ConfigError, match="router_l2.coeff must be a number"):
        load_train_config(None, ["router_l2.coeff=abc"])


def test_an_unregistered_objective_is_refused_at_load():
    from sara_megatron.training import load_train_config
    from sara_megatron.training.config import ConfigError

    with pytest.raises(ConfigError, match="sara.objective must be one of sara, aes, shifcon"):
        load_train_config(None, ["sara.objective=router_l2"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_train_config(None, ["router_l2.coeff=1"])


def test_the_built_in_objectives_are_registered():
    assert list(registered_objectives())[:3] == ["sara", "aes", "shifcon"]
    for name in ("sara", "aes", "shifcon"):
        assert objective_class(name).name == name
        assert objective_class(name).section == name
    with pytest.raises(ValueError, match="already"):
        register_objective(type("Other", (Objective,), {"name": "aes"}))
