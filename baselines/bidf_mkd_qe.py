"""``bidf-mkd-qe``: BiDf-MKD with a query-efficient zero-order recovery (issue 15).

Everything but the estimator is :class:`baselines.bidf_mkd.BiDfMKD` (the faithful method stays
registered as ``bidf-mkd``). The estimator's directions live in a low-resolution subspace of the image
(a grid of ``H/4 x H/4`` cells per channel, the generator's base resolution, nearest-upsampled) and are
orthonormal per sample, so the same number of directions estimates a 16x lower-dimensional gradient
(``baselines.zo``). At ``paper`` scale it uses q = 33 directions, a third of the reference's 100, i.e. a
third of the reference's queries per API visit; ``benchmarks/bench_recovery.py`` prints teacher
agreement on recovered sets against queries spent for both estimators on the same API.
"""

from __future__ import annotations

from dfml_bench.access import OUTPUT_KINDS

from .bidf_mkd import BiDfMKD

# what differs from bidf-mkd's scale defaults
QE_OVERRIDES = {
    "paper": dict(q=33, estimator="subspace", orthogonal=True),  # 2.04M queries per visit instead of 6.06M
    "cpu": dict(q=8, estimator="subspace", orthogonal=True),  # bidf-mkd's cpu spend, so the sweep compares like with like
}


class BiDfMKDQE(BiDfMKD):
    """BiDf-MKD whose ZO recovery estimates the gradient in a low-resolution subspace with orthonormal
    directions (``estimator="subspace"``, ``orthogonal=True``), q = 33 at ``paper`` scale (reference 100).

    Outputs (all four kinds run): ``logits`` as the reference; ``probs`` and ``topk`` as ``bidf-mkd``
    (log-probabilities in place of logits; top-k with the missing mass spread evenly); ``label``: the
    API's label becomes the log of a one-hot distribution, so recovery minimises a smoothed 0-1 loss
    (ZO with the large radius ``label_mu``, so perturbed points cross decision boundaries), KD becomes
    cross-entropy on the API's labels, and the boundary term is off (an L1 distance to a one-hot answer
    says nothing about the student's margin). The plan (visits, q, iterations, estimator, radius) is
    made from ``context.budget`` and written to the record as ``bidf-mkd`` does.
    """

    name = "bidf-mkd-qe"
    output_kinds = frozenset(OUTPUT_KINDS)
    description = "bidf-mkd with a query-efficient ZO recovery (low-res orthogonal directions, q/3); runs on hard labels too"

    def _scale_defaults(self, scale: str) -> dict:
        hp = super()._scale_defaults(scale)
        hp.update(QE_OVERRIDES.get(scale, {}))
        return hp
