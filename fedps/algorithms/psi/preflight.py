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
from fedps.engine.preflight import InputCheck, check_keys, renamed, with_public
from fedps.errors import ConfigError


#: Whether the training layout (fedps.engine.layout) takes a guest's repeated ids (one-to-many PSI
#: output: rows sharing a psi_hash). Until it does, a training job refuses ``keep`` on the guest too.
LAYOUT_TAKES_REPEATED_IDS = False


def psi_settings(config: Any, raw: Mapping[str, Any], where: str = "job.params") -> params_module.PsiParams:
    """The PSI settings in table ``where`` of the config, every key and value checked and named."""
    source = config.source
    check_keys(raw, [f.name for f in dataclasses.fields(params_module.PsiParams)], where, source)
    base = Path(source).parent if source != "<memory>" else Path.cwd()
    try:
        params = params_module.from_mapping(raw, base)
    except ConfigError as exc:
        raise renamed(ConfigError(f"{exc} (in {source})"), where) from None
    if where != "job.params":   # the PSI of a training job
        check_one_to_many(params, config.party.role, where, source)
    return params


def check_one_to_many(params: params_module.PsiParams, role: str, where: str, source: str) -> None:
    """In a training job only the guest may keep repeated ids (``on_duplicate = "keep"``).

    The guest's rows are the samples (it holds the labels): its several rows of
    one id each meet the host's one row of that id, which the host computes on
    once. A host's repeated ids would need the guest to repeat its label for
    each, so to learn each id's multiplicity; and repeats on both sides have no
    one meaning (a cross product?). Both are refused here, before any work.
    """
    if params.on_duplicate == "keep" and role == "guest" and not LAYOUT_TAKES_REPEATED_IDS:
        text = (f"{where}.on_duplicate = \"keep\" (one-to-many ids): the training layout does not take "
                f"repeated ids yet (one row per id on each side); set it to \"refuse\" or \"drop\", or run "
                f"the PSI as its own job (algorithm = \"psi\") to keep every row (in {source})")
        raise with_public(ConfigError(text), f"{where}.on_duplicate = \"keep\" is not taken by training yet")
    if params.on_duplicate == "keep" and role != "guest":
        text = (f"{where}.on_duplicate = \"keep\" (one-to-many ids) is only for the guest in a training "
                f"job: the vertical join needs one row per id on every host; set it to \"refuse\" or "
                f"\"drop\" on {role} (in {source})")
        raise with_public(ConfigError(text), f"{where}.on_duplicate = \"keep\" is only for the guest in a "
                                             "training job (one row per id on every host)")


def check_protocol(params: params_module.PsiParams, where: str = "job.params") -> None:
    """The chosen protocol can run here: ``ot`` needs its library's own venv (``make ot-env``)."""
    if params.protocol != "ot":
        return
    from fedps.algorithms.psi.ot import check_installed

    try:
        check_installed()
    except ConfigError as exc:
        raise with_public(renamed(exc, where), f"{where}.protocol = \"ot\": the OT PSI library is not "
                                               "installed there (make ot-env)") from None


def preflight(config: Any, output_dir: Path) -> list[InputCheck]:
    """A PSI job's checks: its settings, then its input's path and id column (no features)."""
    params = psi_settings(config, config.job.params)
    check_protocol(params)
    return [InputCheck("the PSI input", params.input, "job.params.input", id_column=params.id_column,
                       format=params.format, features=False)]
