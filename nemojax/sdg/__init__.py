"""Synthetic data generation: the Nemotron-4 SDG pipeline (see docs/SDG.md).

Submodules are imported on use so `import nemojax.sdg.instructions` stays light.
"""
