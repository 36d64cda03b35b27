"""Errors that reach the user as one clear message, without a traceback."""


class TaxonclipError(Exception):
    """Base for every error caused by input the user can fix (a file, a column, a parameter)."""


class DataError(TaxonclipError):
    """A manifest, image or dataset folder that cannot be used as given."""


class ModelError(TaxonclipError):
    """A model name, weights file or checkpoint that cannot be loaded."""


class ConfigError(TaxonclipError):
    """A parameter or sweep file that is malformed or out of range."""


class TrackingError(TaxonclipError):
    """The MLflow tracking server or a run cannot be reached or read."""


class MetricNotInTable(ConfigError):
    """A metric names a taxa/level cell the evaluation table lacks: no run could report it."""


class TrainingDiverged(TaxonclipError):
    """The training loss became nan or infinite: the run cannot go on from there."""


class UsageError(ConfigError):
    """A command line that does not parse: an unknown parameter, a missing value."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class DiskError(TaxonclipError):
    """A write the disk refused (full, over quota, not writable): nothing partial was left, and
    a training stopped by it stays resumable once space is freed."""
