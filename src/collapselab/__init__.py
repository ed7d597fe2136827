"""collapselab: recursive retraining of diffusion models and the theory of model collapse.

Implements the pipeline and measurements of arXiv 2602.16601 ("Quantifying Error Propagation
and Model Collapse in Diffusion Models").

Python API (docs/api.md): ``collapselab.run(preset_or_yaml, out=..., overrides=[...])`` and
``collapselab.load(DIR)``.
"""

__version__ = "0.1.0"
__all__ = ["GenerationDone", "Run", "load", "run"]


def __getattr__(name):
    # The API is imported on first use, so `import collapselab` stays light (no torch/pandas).
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'collapselab' has no attribute {name!r}")
