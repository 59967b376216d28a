"""Distribution-matching family: TDM and the DMD / DMD2 baselines (docs/methods.md §4.3, §5.5).

Two networks train in one step (docs/design.md "Losses"): the generator (the student) and an
auxiliary *fake score* ``f_psi`` that tracks the generator's own distribution. Each has its own
terms, differentiated only w.r.t. its own params; the other network is a constant. One file per
method: :mod:`.tdm` (``tdm``, ``tdm_fake``), :mod:`.dmd` (``dmd``, ``dmd_fake``); shared:
:mod:`.common` (the normaliser, its metrics and its guard).

What the engine provides: ``inputs.student`` (student wrapper), ``inputs.net("fake")`` (fake-score
wrapper, a :class:`Student` whose ``x0_eps`` is used), ``inputs.others["fake"]`` for generator
terms and ``inputs.others["student"]`` for fake terms; batch ``{"noise": (B, ...), "label": (B,)?}``.

Teacher cost (metric ``teacher_nfe`` of ``tdm`` / ``dmd``): one teacher ``x0`` per example, two
with ``guidance != 1`` (CFG baked into the target); the fake terms never call the teacher.

Degenerate normaliser guard (``tdm`` / ``dmd``, docs/methods.md pitfall 13): the per-sample
gradient scale ``mean_D |x0_fake - x0_real| / (wf + eps)`` (the size of the normalised DM
direction; O(1) when the normaliser is healthy) above ``max_grad_scale``, or a finite normaliser
``wf`` above ``max_normalizer`` (the student's sample or the teacher's target has run away), makes
the term's loss NaN and sets its flag ``nonfinite/normalizer``: the train loop stops naming
``<term>/normalizer`` (or skips the step with ``train.skip_nonfinite``). Metrics
``grad_scale_max`` and ``normalizer_max`` show how close a run is; None disables a check.

Importing this package registers every term; the names below are the family's public pieces.
"""

from fewstep_jax.losses.distribution_matching import dmd, tdm
from fewstep_jax.losses.distribution_matching.common import NORMALIZER_GUARD, guard_normalizer
from fewstep_jax.losses.distribution_matching.dmd import DMD_DEFAULTS, DMD_FAKE_DEFAULTS, dmd_surrogate
from fewstep_jax.losses.distribution_matching.tdm import (
    TDM_DEFAULTS,
    TDM_FAKE_DEFAULTS,
    backward_simulate,
    diffuse,
    importance_log_weight,
    tdm_sample,
    tdm_surrogate,
)

__all__ = [
    "DMD_DEFAULTS",
    "DMD_FAKE_DEFAULTS",
    "NORMALIZER_GUARD",
    "TDM_DEFAULTS",
    "TDM_FAKE_DEFAULTS",
    "backward_simulate",
    "diffuse",
    "dmd",
    "dmd_surrogate",
    "guard_normalizer",
    "importance_log_weight",
    "tdm",
    "tdm_sample",
    "tdm_surrogate",
]
