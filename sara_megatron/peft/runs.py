"""A LoRA run's settings and its record in every checkpoint: which base it adapts.

A LoRA checkpoint holds adapters, the trained router and their optimizer state; the frozen base
is `model.checkpoint`. Each save records the base's fingerprint (`priors.fingerprint`: the
converted HF files' hash, or the checkpoint files' own) and the adapter settings, so a resume or
an export against another base, or with other adapters, is refused in one line.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from sara_megatron.peft.lora import LoraSettings
from sara_megatron.tool_errors import UserFacingError


class AdapterBaseMismatchError(UserFacingError, ValueError):
    """Adapters trained on one base checkpoint, used with another."""


def lora_settings(cfg) -> LoraSettings:
    """The `LoraSettings` of a `TrainConfig` whose `peft.method` is lora (seeded by `cfg.seed`).

    Args:
        cfg: the run's `TrainConfig`; its `peft` section gives rank, alpha, dropout, targets,
            expert adapters and router mode.
    """
    p = cfg.peft
    return LoraSettings(rank=p.rank, alpha=p.alpha, dropout=p.dropout, targets=tuple(p.targets),
                        expert_adapters=p.expert_adapters, router=p.router, seed=cfg.seed)


@functools.lru_cache(maxsize=8)
def _fingerprint(checkpoint_dir: str) -> str:
    from sara_megatron.priors.fingerprint import model_fingerprint

    return model_fingerprint(checkpoint_dir)


def base_fingerprint(checkpoint_dir: Optional[str], preset: str, seed: int) -> str:
    """The identity of the base a LoRA run adapts.

    Args:
        checkpoint_dir: `model.checkpoint`, or None for a randomly initialised base.
        preset: `model.preset` (names a random base with `seed`).
        seed: the run's seed (a random base is drawn from it).

    Returns:
        `priors.fingerprint.model_fingerprint` of the checkpoint, or "random-init:<preset>:<seed>".
    """
    if checkpoint_dir is None:
        return f"random-init:{preset}:{seed}"
    return _fingerprint(os.path.abspath(checkpoint_dir))


def peft_record(cfg) -> dict:
    """What a LoRA checkpoint records of its run: the adapter settings and the base's identity.

    Args:
        cfg: the run's `TrainConfig` (its `peft`, `model.checkpoint`, `model.preset` and `seed`).

    Returns:
        A JSON-ready dict: method, rank, alpha, targets, expert_adapters, router, the base
        checkpoint's absolute path (None for a random base) and `base_fingerprint`.
    """
    p = cfg.peft
    return {"method": p.method, "rank": p.rank, "alpha": p.alpha, "targets": list(p.targets),
            "expert_adapters": p.expert_adapters, "router": p.router,
            "base_checkpoint": os.path.abspath(cfg.model.checkpoint) if cfg.model.checkpoint else None,
            "base_fingerprint": base_fingerprint(cfg.model.checkpoint, cfg.model.preset, cfg.seed)}


_SHAPE_KEYS = ("method", "rank", "targets", "expert_adapters", "router")


def check_adapter_base(saved: Optional[dict], fingerprint: str, where: str) -> None:
    """Refuse adapters recorded against another base.

    Args:
        saved: the checkpoint's "peft" record (`peft_record`), None for a full fine-tuning one.
        fingerprint: the base about to be used (`base_fingerprint`).
        where: the checkpoint folder, for the message.

    Raises:
        AdapterBaseMismatchError: no LoRA record, or another base fingerprint.
    """
    if saved is None:
        raise AdapterBaseMismatchError(f"{where} holds no LoRA adapters (a full fine-tuning "
                                       "checkpoint); leave peft.method unset to use it")
    if saved.get("base_fingerprint") != fingerprint:
        raise AdapterBaseMismatchError(
            f"{where} holds LoRA adapters trained on base {saved.get('base_checkpoint')} "
            f"({saved.get('base_fingerprint')}), not on this base ({fingerprint}): use the "
            "base they were trained on (model.checkpoint)")


def resume_problem(saved_trainer: dict, cfg, checkpoint_dir: str) -> Optional[str]:
    """Why the run `cfg` cannot resume from a checkpoint whose trainer record is `saved_trainer`
    (LoRA against full fine-tuning, another base, other adapter shapes), or None.

    Args:
        saved_trainer: the checkpoint's "trainer" entry.
        cfg: the run's `TrainConfig`.
        checkpoint_dir: the checkpoint folder, for the message.
    """
    saved = saved_trainer.get("peft")
    if not cfg.peft.lora:
        if saved is not None:
            return (f"cannot resume from {checkpoint_dir}: it holds LoRA adapters only "
                    "(peft.method lora); set peft.method lora and its base as model.checkpoint")
        return None
    try:
        check_adapter_base(saved, base_fingerprint(cfg.model.checkpoint, cfg.model.preset,
                                                   cfg.seed), checkpoint_dir)
    except AdapterBaseMismatchError as err:
        return f"cannot resume: {err}"
    own = peft_record(cfg)
    changed = [f"peft.{k}: checkpoint {saved.get(k)!r}, config {own[k]!r}"
               for k in _SHAPE_KEYS if saved.get(k) != own[k]]
    if changed:
        return (f"cannot resume from {checkpoint_dir}: its adapters were built with other "
                f"settings ({'; '.join(changed)})")
    return None
