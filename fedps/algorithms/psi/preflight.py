"""PSI's own checks before any work: its settings (also as ``job.params.psi`` of a training job) and its input.

A PSI-only job checks its input's path and id column in the runner's one
pass (:class:`fedps.engine.preflight.InputCheck` without features); a
training job with a PSI first adds its label and feature checks to the same
input (``hetero_lr.preflight``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from fedps.algorithms.psi import params as params_module
from fedps.engine.preflight import InputCheck, check_keys, renamed
from fedps.errors import ConfigError


def psi_settings(config: Any, raw: Mapping[str, Any], where: str = "job.params") -> params_module.PsiParams:
    """The PSI settings in table ``where`` of the config, every key and value checked and named."""
    source = config.source
    check_keys(raw, [f.name for f in dataclasses.fields(params_module.PsiParams)], where, source)
    base = Path(source).parent if source != "<memory>" else Path.cwd()
    try:
        return params_module.from_mapping(raw, base)
    except ConfigError as exc:
        raise renamed(ConfigError(f"{exc} (in {source})"), where) from None


def preflight(config: Any, output_dir: Path) -> list[InputCheck]:
    """A PSI job's checks: its settings, then its input's path and id column (no features)."""
    params = psi_settings(config, config.job.params)
    return [InputCheck("the PSI input", params.input, "job.params.input", id_column=params.id_column,
                       format=params.format, features=False)]
