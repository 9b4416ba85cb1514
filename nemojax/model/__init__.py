"""The Nemotron-4 model family: see transformer.py for the decoder, layers.py and attention.py for parts."""

from nemojax.model.transformer import KVCache, NemotronLM, abstract_model, init_model, logical_axes

__all__ = ["KVCache", "NemotronLM", "abstract_model", "init_model", "logical_axes"]
