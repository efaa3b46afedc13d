"""scikit-learn's common estimator checks, including sample-weight equivalence, for every solver.

No check is expected to fail.  Tolerances: the sample-weight equivalence checks compare the fits on
weighted vs repeated data at rtol=1e-7, so each solver runs with a ``tol`` that converges that far (the
two fits follow different paths, and coefficients differ by about gradient / curvature).  Plain SGD
cannot reach such precision in the checks' budget (its two fits see different minibatches) and is
listed as an expected failure for those two checks and the class-weight check, with the reason.
"""

import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from softxent import SoftmaxRegression  # noqa: E402

_WEIGHT_CHECKS = {"check_sample_weight_equivalence_on_dense_data",
                  "check_sample_weight_equivalence_on_sparse_data"}


def _expected_failures(est):
    failures = {}
    if est.solver == "sgd":
        failures.update({c: "stochastic solver: the fits on weighted and on repeated rows see different "
                            "minibatches, so they differ by the sampling noise, not by 1e-7"
                         for c in _WEIGHT_CHECKS})
        failures["check_class_weight_classifiers"] = (
            "plain SGD on the check's unscaled blobs (std 20, class weights 1000 : 1e-4, unpenalised "
            "intercept) is too ill-conditioned to pass the 0.87 accuracy bar in 1000 epochs; adam and the "
            "full-batch solvers pass it")
    return failures


@parametrize_with_checks(
    [
        SoftmaxRegression(),
        SoftmaxRegression(solver="newton-cg", tol=1e-9),
        SoftmaxRegression(solver="gd", alpha=1.0, tol=1e-11, max_iter=5000),
        SoftmaxRegression(solver="proximal", l1_ratio=0.5, alpha=0.1, tol=1e-11, max_iter=5000),
        SoftmaxRegression(solver="sgd", max_iter=50, random_state=0),
        SoftmaxRegression(solver="adam", max_iter=50, random_state=0),
    ],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
