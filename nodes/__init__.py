"""ComfyUI node classes of the pack (schema and tensor plumbing only; model logic lives in `metaqueries_core`)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
