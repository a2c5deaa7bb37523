"""Generation: text->image with a static K/V cache and fused sampling, self-reranking by caption score,
captioning, image completion and super-resolution (cogview.generation.super_resolution). The functions
take a `cogview.CogView` first and are also its methods (`model.generate(...)`); see
cogview.generation.api for the details."""
from cogview.generation.api import GenerationResult, caption, complete, generate, image_seed, score
from cogview.generation.images import codes_from_images, image_grid, load_image_file, pil_to_tensor, tensor_to_pil
from cogview.generation.sampler import kv_cache_bytes, sample_image_codes
from cogview.generation.super_resolution import (
    SuperResolutionPipeline,
    UpscaleResult,
    evaluate_super_resolution,
    low_res_pixels,
    super_resolve_codes,
    upscale,
    upscale_codes,
)

__all__ = [
    "GenerationResult",
    "caption",
    "codes_from_images",
    "complete",
    "generate",
    "image_grid",
    "image_seed",
    "kv_cache_bytes",
    "load_image_file",
    "pil_to_tensor",
    "sample_image_codes",
    "score",
    "tensor_to_pil",
    "SuperResolutionPipeline",
    "UpscaleResult",
    "evaluate_super_resolution",
    "low_res_pixels",
    "super_resolve_codes",
    "upscale",
    "upscale_codes",
]
