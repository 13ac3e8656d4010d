"""ComfyUI node classes of the pack (schema and tensor plumbing only; model logic lives in `metaqueries_core`).

Importable without ComfyUI: every ComfyUI service is reached through `comfy_env`, which falls back to plain behaviour.
"""

from .conditioning import Connector, EditConditioning, Encode
from .loaders import LoadCheckpoint, LoadDecoder, LoadMLLM
from .sampling import DiffusionSample
from .understanding import Describe

_NODES = {
    "MetaQueries_LoadMLLM": (LoadMLLM, "Load MLLM (MetaQueries)"),
    "MetaQueries_LoadCheckpoint": (LoadCheckpoint, "Load MetaQuery Checkpoint"),
    "MetaQueries_LoadDecoder": (LoadDecoder, "Load Diffusion Decoder (MetaQueries)"),
    "MetaQueries_Encode": (Encode, "MetaQuery Encode"),
    "MetaQueries_Connector": (Connector, "MetaQuery Connector"),
    "MetaQueries_EditConditioning": (EditConditioning, "MetaQuery Edit Conditioning"),
    "MetaQueries_DiffusionSample": (DiffusionSample, "Diffusion Sample (MetaQueries)"),
    "MetaQueries_Describe": (Describe, "MLLM Describe / Ask (MetaQueries)"),
}

NODE_CLASS_MAPPINGS: dict[str, type] = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {node_id: name for node_id, (_, name) in _NODES.items()}
