"""The GPU servers' images: one place for compose.yaml's defaults, the launch checks and the model card.

compose.yaml reads TGI_IMAGE and VLLM_IMAGE from .env (`make pin-images` writes them there as
tag@sha256:digest); these are the tag-only defaults it falls back to. A test holds compose.yaml,
.env.example and these constants to the same values.
"""

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.7"
VLLM_IMAGE = "vllm/vllm-openai:v0.33.0"
