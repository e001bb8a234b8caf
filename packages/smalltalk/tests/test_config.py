"""The model folder's config: validation, round trip, clear errors."""

import json

import pytest

from verger.core.settings import SettingsError
from verger.smalltalk.config import SmallTalkConfig, TrainExpertSettings, expert_name


def test_bad_values_name_the_field():
    with pytest.raises(SettingsError, match="num_experts=1 must be an int >= 2"):
        SmallTalkConfig(num_experts=1)
    with pytest.raises(SettingsError, match="prefix_len=200 is longer than the sequence"):
        SmallTalkConfig(seq_len=128, prefix_len=200)
    with pytest.raises(SettingsError, match="d_model=30 / n_heads=4"):
        SmallTalkConfig(d_model=30, n_heads=4)
    with pytest.raises(SettingsError, match="em_sequences=3 must be >= num_experts=4"):
        SmallTalkConfig(em_sequences=3)
    with pytest.raises(SettingsError, match="assign_method"):
        SmallTalkConfig(assign_method="best")
    with pytest.raises(SettingsError, match="zero_stage=2 needs engine='deepspeed'"):
        TrainExpertSettings(zero_stage=2)
    with pytest.raises(SettingsError, match="expert='x' must be an expert index"):
        TrainExpertSettings(expert="x")


def test_round_trip_and_derived_values(tmp_path):
    config = SmallTalkConfig(num_experts=3, expert_steps=10, seq_len=64, prefix_len=16)
    config.save(tmp_path)
    assert SmallTalkConfig.load(tmp_path) == config
    assert config.total_dense_steps == 30  # equal total tokens
    assert config.replace(dense_steps=7).total_dense_steps == 7
    assert config.router_model(257).max_seq_len == 64
    assert config.expert_model(257).d_model == config.d_model
    assert expert_name(3) == expert_name("3") == expert_name("expert-03") == "expert-03"
    assert expert_name("dense") == "dense"


def test_loading_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a SmallTalk model folder"):
        SmallTalkConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": 1, "smalltalk": {"seq_len": 0}}))
    with pytest.raises(ValueError, match="damaged or not a SmallTalk config"):
        SmallTalkConfig.load(tmp_path)
