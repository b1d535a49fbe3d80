"""Find the profile to apply: a given file, the one cached for this model, or a calibration made once.

Cached profiles live in ``$UNCOMP_CACHE/profiles/<model fingerprint>.safetensors``, so any model
with the same shapes and weights' config finds its profile again, whatever path it was loaded from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from uncomp_cli.models.loading import LoadedModel, cache_root
from uncomp_cli.profile.file import Profile, load_profile, model_fingerprint, save_profile

log = logging.getLogger(__name__)

#: Built-in calibration when no profile exists yet: as `uncomp calibrate`'s defaults.
AUTO_SAMPLES = 8
AUTO_SEQ_LEN = 2048


def cached_profile_path(config) -> Path:
    return cache_root() / "profiles" / f"{model_fingerprint(config)}.safetensors"


def profile_for(loaded: LoadedModel, path: str | Path | None = None, samples: int = AUTO_SAMPLES,
                seq_len: int = AUTO_SEQ_LEN) -> Profile:
    """The profile for ``loaded``, checked against it.

    With ``path``: that file (a mismatch with the model is a :class:`ProfileError`). Without: the
    profile cached for the model's fingerprint, or a new one calibrated on the built-in source
    (``samples`` windows of ``seq_len`` tokens, shortened to the model's context) and cached.
    """
    config = loaded.model.config
    if path is not None:
        profile = load_profile(path)
        profile.check_model(config, loaded.name)
        return profile
    cached = cached_profile_path(config)
    if cached.is_file():
        profile = load_profile(cached)
        profile.check_model(config, loaded.name)
        log.debug("using the cached profile %s", cached)
        return profile

    from uncomp_cli.models.prompting import context_length
    from uncomp_cli.profile.calibrate import calibrate_loaded

    seq_len = min(seq_len, context_length(config))
    log.info("no profile for %s yet: calibrating once on the built-in source (%d × %d tokens), "
             "cached in %s", loaded.name, samples, seq_len, cached)
    profile = calibrate_loaded(loaded, samples=samples, seq_len=seq_len)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_profile(profile, cached)
    return profile
