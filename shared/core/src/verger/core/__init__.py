"""verger-core: the shared foundation of the verger packages.

Sub-modules are imported explicitly (``from verger.core.nn import TransformerLM``); this top level
re-exports only the small runtime helpers so that ``import verger.core`` stays cheap.
"""

from verger.core.runtime import default_device, package_version, resolve_device, seed_everything

__version__ = package_version("verger-core")

__all__ = [
    "__version__",
    "default_device",
    "package_version",
    "resolve_device",
    "seed_everything",
]
