"""Contract suites and test doubles that built-in and third-party plugins run.

Public API (imported lazily, so that ``import pchmr.testing.strategies`` in a simulated Flower
client does not pay for torch):

* suites, one per plugin kind (``<Kind>Contract`` for every kind of
  :data:`~pchmr.core.contracts.hookspecs.KINDS`; ``docs/plugins.md`` documents each):
  :class:`BackboneContract` (:mod:`.backbones`), :class:`BodyModelContract` (:mod:`.bodymodels`),
  :class:`DatasetContract` (:mod:`.datasets`), :class:`PartitionerContract` and its small
  :func:`contract_data` (:mod:`.partitioners`), :class:`StrategyContract` (:mod:`.strategies`),
  :class:`PrivacyContract` (:mod:`.privacy`; its rounds in :mod:`.rounds`),
  :class:`AnnotatorContract` and :func:`contract_observations` (:mod:`.annotators`),
  :class:`KeypointSourceContract` and :class:`DepthSourceContract` (:mod:`.sources`),
  :class:`AttackContract` and its tiny finished run :func:`contract_run` (:mod:`.attacks`);
* doubles: :class:`ToyBodyModel`, :func:`toy_batch` (:mod:`.toys`);
* the machinery a plugin's own tests use: :func:`registered` (a plugin by kind and name, through
  the entry points), :func:`plugin_info`, :func:`hmr_module` (a backbone in the training loop)
  (:mod:`.plugins`);
* fake licence-restricted files: :func:`write_fake_smpl`, :func:`write_fake_h36m_regressor`,
  :func:`write_fake_graphcmr_downsampling` (:mod:`.fake_smpl`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AnnotatorContract",
    "AttackContract",
    "BackboneContract",
    "BodyModelContract",
    "DatasetContract",
    "DepthSourceContract",
    "KeypointSourceContract",
    "PartitionerContract",
    "PrivacyContract",
    "StrategyContract",
    "ToyBodyModel",
    "contract_data",
    "contract_observations",
    "contract_run",
    "hmr_module",
    "plugin_info",
    "registered",
    "toy_batch",
    "write_fake_graphcmr_downsampling",
    "write_fake_h36m_regressor",
    "write_fake_smpl",
]

#: Public name → the submodule defining it.
_HOMES = {
    "AnnotatorContract": "annotators",
    "AttackContract": "attacks",
    "contract_run": "attacks",
    "contract_observations": "annotators",
    "BackboneContract": "backbones",
    "BodyModelContract": "bodymodels",
    "DatasetContract": "datasets",
    "KeypointSourceContract": "sources",
    "DepthSourceContract": "sources",
    "StrategyContract": "strategies",
    "PrivacyContract": "privacy",
    "PartitionerContract": "partitioners",
    "contract_data": "partitioners",
    "ToyBodyModel": "toys",
    "toy_batch": "toys",
    "hmr_module": "plugins",
    "plugin_info": "plugins",
    "registered": "plugins",
    "write_fake_graphcmr_downsampling": "fake_smpl",
    "write_fake_h36m_regressor": "fake_smpl",
    "write_fake_smpl": "fake_smpl",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from pchmr.testing.annotators import AnnotatorContract, contract_observations
    from pchmr.testing.attacks import AttackContract, contract_run
    from pchmr.testing.backbones import BackboneContract
    from pchmr.testing.bodymodels import BodyModelContract
    from pchmr.testing.datasets import DatasetContract
    from pchmr.testing.fake_smpl import (
        write_fake_graphcmr_downsampling,
        write_fake_h36m_regressor,
        write_fake_smpl,
    )
    from pchmr.testing.partitioners import PartitionerContract, contract_data
    from pchmr.testing.plugins import hmr_module, plugin_info, registered
    from pchmr.testing.privacy import PrivacyContract
    from pchmr.testing.sources import DepthSourceContract, KeypointSourceContract
    from pchmr.testing.strategies import StrategyContract
    from pchmr.testing.toys import ToyBodyModel, toy_batch


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pchmr.testing' has no attribute {name!r}; it offers {', '.join(__all__)}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
