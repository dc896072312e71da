"""vlp: vision-language pretraining in JAX/Flax, from one CPU to TPU pods and GPU clusters."""

__version__ = "0.1.0"
