"""Importers: checkpoints of other MetaQuery trainers written as this pack's checkpoint format (DESIGN.md section 3).

- `reference`: the MetaQuery reference trainer (facebookresearch/metaquery), `python -m
  metaqueries_core.importers.reference FOLDER OUT.safetensors`.
"""

from .reference import import_reference

__all__ = ["import_reference"]
