"""Config files shipped inside pchmr (data only, no code), addressed as ``COLLECTION:NAME``.

* ``paper/``: one ``pchmr run`` config per row and model of the PCHMR paper's Tables 1-4 and 8-12
  (``--config paper:table01-fastmetro-s-fedavg-10-10-iid``; docs/paper.md);
* ``settings/``: experimental settings of pchmr's own (``--config settings:noniid-conflict``);
* ``sweeps/``: ``pchmr sweep`` files (``pchmr sweep sweeps:strategies``; docs/sweep.md).

``pchmr configs list`` names them and ``pchmr configs show REF`` prints one, to copy and edit.
The lookup is :mod:`pchmr.core.engine.packaged_configs`.
"""
