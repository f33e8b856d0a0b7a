"""The experiment kinds: one package each, holding its experiment class, planning,
decoding, dataset summaries and figures. Importing this package registers every kind
in `nnexp.registry.KINDS`, in this order."""

from . import patching  # noqa: F401
from . import logit_attribution  # noqa: F401
from . import gradient_attribution  # noqa: F401
from . import attention_knockout  # noqa: F401
from . import attribute_extraction  # noqa: F401
from . import sublayer_knockout  # noqa: F401
from . import causal_tracing  # noqa: F401
from . import interventions  # noqa: F401
from . import attribution_patching  # noqa: F401
