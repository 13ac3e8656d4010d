"""Importers: checkpoints of other MetaQuery trainers written as this pack's checkpoint format (DESIGN.md section 3).

- `reference`: the MetaQuery reference trainer (facebookresearch/metaquery), `python -m
  metaqueries_core.importers.reference FOLDER OUT.safetensors`;
- `openuni`: OpenUni's .pth checkpoints (wusize/OpenUni), `python -m metaqueries_core.importers.openuni CKPT.pth
  OUT.safetensors --mllm INTERNVL3_FOLDER`.
"""

from .openuni import import_openuni
from .reference import import_reference

__all__ = ["import_openuni", "import_reference"]
