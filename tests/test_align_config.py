"""`nemojax align` config: a base given as an existing checkpoint hands its recorded shape to
every stage trained on it (a stage config's own `model:` section, e.g. toy_model.yaml's 4 layers,
must not be used with a 2-layer checkpoint); bad base checkpoints are one-line errors."""

from __future__ import annotations

import pytest

from nemojax.align.config import load_align_config
from nemojax.align.loop import AlignError, AlignLoop
from tests.sdg_helpers import save_random_lm


def test_checkpoint_base_gives_stages_its_shape(tmp_path) -> None:
    ckpt = save_random_lm(tmp_path / "lm", max_seq_len=128)
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}", f"bases.strong={{checkpoint: {ckpt}}}"])
    loop = AlignLoop(cfg)
    shape = loop.architecture("strong")
    assert shape == ["model.vocab_size=4096", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                     "model.num_kv_heads=2", "model.head_dim=16", "model.ffn_hidden_size=128", "model.max_seq_len=128"]
    # a base trained by the loop still contributes its own model.* overrides
    assert loop.architecture("weak") == ["model.num_layers=2"]


def test_missing_base_checkpoint_is_named(tmp_path) -> None:
    cfg = load_align_config("configs/align/toy.yaml", [f"run_dir={tmp_path / 'run'}",
                                                       f"bases.strong={{checkpoint: {tmp_path / 'nope'}}}"])
    with pytest.raises(AlignError, match="base checkpoint .*nope.*does not exist"):
        AlignLoop(cfg).architecture("strong")


def test_a_world_needs_a_prompt_pool_per_iteration(tmp_path) -> None:
    """Iteration k's SDG reads the world's prompts/pool_k.jsonl: too few pools is refused when the
    config loads (it used to fail at iteration 3's SDG, two hours into configs/align/judge.yaml)."""
    from nemojax.config import ConfigError
    with pytest.raises(ConfigError) as e:
        load_align_config("configs/align/judge.yaml", [f"run_dir={tmp_path}", "world.spec.pools=2"])
    assert str(e.value) == ("world.spec.pools=2 but there are 3 iterations: iteration k's SDG reads the world's "
                            "prompts/pool_k.jsonl; set world.spec.pools: 3")
    assert load_align_config("configs/align/judge.yaml", [f"run_dir={tmp_path}"]).world.spec["pools"] == 3
    assert "pools" not in load_align_config("configs/align/stats.yaml", [f"run_dir={tmp_path}"]).world.spec
