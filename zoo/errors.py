"""One error hierarchy for the zoo side. Library code raises these; only ``zoo.cli`` prints them.

Every message says what to do next. ``exit_code`` is what the CLI exits with (1 failure, 2 usage).
"""
from __future__ import annotations

__all__ = [
    "ZooError", "UsageError", "FcDropoutError", "UnknownModelError", "RegistryError", "DownloadError", "IntegrityError",
    "OfflineError", "CacheError", "WeightsError", "BundleError", "PushError", "ServeError",
]


class ZooError(Exception):
    """Base class: a failure the user can act on. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1


class UsageError(ZooError):
    """The command line or an argument is wrong."""

    exit_code = 2


class FcDropoutError(UsageError):
    """``--fc-dropout`` for a model without VGG's FC-4096 layers: ``where`` names the value as the user gave it
    (the CLI says ``fc_dropout P in FILE`` when a ``--config`` file gave it)."""

    def __init__(self, model: str, where: str = "--fc-dropout") -> None:
        self.model = model
        super().__init__(f"{where} applies to VGG's FC-4096 layers; {model} has none (for a dropout before your "
                         "new classifier use --head mlp --mlp-dropout P)")


class UnknownModelError(UsageError):
    """A model name that is neither in the registry nor a ``timm:``/``hf-hub:`` reference."""


class RegistryError(ZooError):
    """A registry file is malformed (names the file, the entry and the field)."""


class DownloadError(ZooError):
    """Weights could not be fetched."""


class IntegrityError(DownloadError):
    """Bytes on the wire or on disk do not match the expected sha256."""


class OfflineError(DownloadError):
    """Weights are not cached and the network is off (ZOO_OFFLINE / HF_HUB_OFFLINE) or unreachable."""


class CacheError(ZooError):
    """The cache (ZOO_HOME) is unusable: read-only, full, or corrupt."""


class WeightsError(ZooError):
    """A weights file does not fit the architecture, or is unsafe to load."""


class BundleError(ZooError):
    """An exported bundle is missing, damaged or inconsistent."""


class PushError(ZooError):
    """Publishing to the Hub failed or was refused (the repo is left as it was)."""


class ServeError(ZooError):
    """``zoo serve`` cannot start (missing extra, port in use...)."""
