"""The ready-made experiments, by the name `nnexp run` knows them.

Add a new one by defining its class in a module here and listing it below.
"""

from .ioi_patching import IOIPatching

EXPERIMENTS = {cls.name: cls for cls in (IOIPatching,)}
