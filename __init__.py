"""ComfyUI-MetaQueries: a ComfyUI custom node pack for MetaQuery image generation.

ComfyUI imports this file as a package. The library (`metaqueries_core`) is imported by absolute name from the nodes,
so the pack folder is put on `sys.path` when the library is not installed; that and node registration are the only
import-time side effects.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
