"""Constants and helpers shared by the test modules (conftest.py holds the fixtures)."""

MLLM_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision", "qwen2", "qwen3"]
VISION_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "llava_onevision"]
