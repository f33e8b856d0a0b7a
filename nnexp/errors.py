"""Errors nnexp raises for bad input: one line that names the problem and the fix.

Every error a user can cause by what they pass (a data file, a model name, a site,
a layer) is an `NnexpError`. The CLI prints its message alone, without a traceback,
so the message must stand on its own: what is wrong, where, and what to do.
"""


class NnexpError(Exception):
    """A problem with what the user asked for, explained in one line."""


class DataError(NnexpError):
    """An example or data file that cannot be used as given."""


class ModelError(NnexpError):
    """A model that cannot be found, loaded or understood."""


class ConfigError(NnexpError):
    """An experiment parameter (site, layer, head, position, metric) that is invalid."""


class ResultsError(NnexpError):
    """A results directory that cannot be read, or belongs to another run."""


class StoreWriteError(ResultsError):
    """A results directory that cannot be written (full disk, read-only, not a folder)."""
