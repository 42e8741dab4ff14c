"""The project's ClientApps (LoRA fine-tuning of causal LMs, encoder classifiers).

They arrive with issue #3; any Flower ClientApp already runs at HPC sites unchanged.
"""
