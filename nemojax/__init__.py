"""nemojax: Nemotron-4 style training, alignment and sampling in JAX + Flax NNX."""

from nemojax.platform import skip_absent_tpu

skip_absent_tpu()  # before JAX starts: no libtpu probe (and its errors) on hosts without TPUs

from nemojax.config import Config, ConfigError, ModelConfig, load_config

__version__ = "0.1.0"


def load(path: str, **kwargs):
    """Load a model from a nemojax checkpoint directory or a Hugging Face Nemotron directory.

    Returns a `NemotronLM`; `model(input_ids, attention_mask=...)` gives fp32 logits. A reward
    checkpoint gives a `NemotronRewardModel`, whose call gives attribute scores [batch, N]
    (`model.reward(scores)` the weighted reward). LoRA adapters come merged into the weights
    (`merge_lora=False` keeps them).
    """
    from nemojax.checkpoint import load_model

    return load_model(path, **kwargs)


__all__ = ["Config", "ConfigError", "ModelConfig", "load", "load_config", "__version__"]
