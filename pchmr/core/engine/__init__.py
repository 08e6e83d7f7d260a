"""The machinery that runs experiments: registry, config, components, the training loop
(HMRModule), losses, evaluation, the run directory, baselines, pretraining, the annotation
pipeline and the federation on Flower's engines.

Imports the kit and the contracts, never a plugin.
"""
