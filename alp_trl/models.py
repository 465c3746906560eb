"""Kept for existing imports: model loading (Hub ids, local folders, `embedded:` models) now lives in
`alp_trl.model_loading`."""

from .model_loading import (  # noqa: F401
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    cache_root,
    is_embedded,
    load_policy,
    resolve_model_path,
)
