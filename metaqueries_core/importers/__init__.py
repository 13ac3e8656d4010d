"""Importers: checkpoints of other MetaQuery trainers written as this pack's checkpoint format (DESIGN.md section 3).

- `reference`: the MetaQuery reference trainer (facebookresearch/metaquery), `python -m
  metaqueries_core.importers.reference FOLDER OUT.safetensors`;
- `openuni`: OpenUni's .pth checkpoints (wusize/OpenUni), `python -m metaqueries_core.importers.openuni CKPT.pth
  OUT.safetensors --mllm INTERNVL3_FOLDER`.
"""

# the importers are not imported here: each runs as `python -m metaqueries_core.importers.<name>`, which warns when
# the package has already imported the module it is about to run
