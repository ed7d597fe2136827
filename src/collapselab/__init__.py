"""collapselab: recursive retraining of diffusion models and the theory of model collapse.

Implements the pipeline and measurements of arXiv 2602.16601 ("Quantifying Error Propagation
and Model Collapse in Diffusion Models").
"""

__version__ = "0.1.0"
