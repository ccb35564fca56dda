"""Chinese-anchor track: priors are keyed by anchor language (a zh-anchored store is refused for
en-anchored shards, before any fingerprint check), and the zh example configs load."""

from pathlib import Path

import numpy as np
import pytest

from sara_megatron.data.sara_dataset import SaraDataConfig
from sara_megatron.data.token_shards import TokenShards
from sara_megatron.priors import PriorStoreWriter
from sara_megatron.priors.loader import build_sara_data_loader
from sara_megatron.priors.store import read_prior_store_metadata
from sara_megatron.priors.store_format import PriorStoreError, PriorStoreMetadata
from sara_megatron.training.config import load_train_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _write_store(path, like, anchor_language, ids):
    """A complete, uniform prior store for `ids` shaped like the store `like`, for `anchor_language`."""
    meta = read_prior_store_metadata(like)
    writer = PriorStoreWriter(path, PriorStoreMetadata(
        layers=meta.layers, num_experts=meta.num_experts, dtype="fp32",
        anchor_language=anchor_language, model_fingerprint=meta.model_fingerprint,
        corpus_fingerprint=f"{anchor_language}-corpus"))
    writer.prepare()
    writer.write_shard(ids, np.full((len(ids), len(meta.layers), meta.num_experts),
                                    1.0 / meta.num_experts, dtype=np.float32))
    writer.finalize(ids)


def test_a_zh_anchored_store_is_refused_for_en_anchored_shards(sara_data, tmp_path):
    shards = TokenShards(sara_data["shards"])
    assert shards.anchor_language == "en"
    ids = [s.meta.sample_id for s in shards.samples("en")]
    _write_store(tmp_path / "zh_store", sara_data["priors"], "zh", ids)

    config = SaraDataConfig(shards_dir=str(sara_data["shards"]), prior_store=str(tmp_path / "zh_store"),
                            micro_batch_size=2)
    with pytest.raises(PriorStoreError, match="'zh'-anchored priors, the shards anchor on 'en'"):
        build_sara_data_loader(config)
    # The en store of the same shards is accepted.
    ok = build_sara_data_loader(SaraDataConfig(shards_dir=str(sara_data["shards"]),
                                               prior_store=str(sara_data["priors"]),
                                               micro_batch_size=2))
    assert len(ok.dataset) > 0


@pytest.mark.parametrize("name", ["qwen3_30b_a3b_sara_zh.yaml", "tiny_cpu_sara_zh.yaml"])
def test_zh_example_configs_load_and_switch_objectives(name):
    config = load_train_config(str(EXAMPLES / name))
    assert config.sara.objective == "sara" and config.sara.lambda_js == 1.5
    assert load_train_config(str(EXAMPLES / name), ["sara.objective=aes", "data.prior_store=null"]
                             ).sara.objective == "aes"
