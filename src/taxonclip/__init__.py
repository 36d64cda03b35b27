"""taxonclip: fine-tune, evaluate, tune and compare image encoders for identifying organisms.

The library imports without MLflow or Optuna doing anything: MLflow calls live in
`taxonclip.tracking`, Optuna calls in `taxonclip.sweep`.
"""

__version__ = "0.1.0"
