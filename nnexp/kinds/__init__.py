"""The experiment kinds: one package each, holding its experiment class, planning,
decoding, dataset summaries and figures. Importing this package registers every kind
in `nnexp.registry.KINDS`."""

from . import patching  # noqa: F401
from . import logit_attribution  # noqa: F401
from . import gradient_attribution  # noqa: F401
