"""scikit-learn's common estimator checks, including sample-weight equivalence, for every solver.

No check is expected to fail.  Tolerances: the sample-weight equivalence checks compare the fits on
weighted vs repeated data at rtol=1e-7, so each solver runs with a ``tol`` that converges that far (the
two fits follow different paths, and coefficients differ by about gradient / curvature).  The checks'
data sets are smaller than the default ``batch_size``, so sgd / adam run one batch per epoch there and the
weighted and repeated fits take the same steps; with several batches they reach the same optimum too
(tests/test_softmax_regression.py::test_minibatch_fit_with_weights_equals_repeated_rows).
"""

import pytest

pytest.importorskip("sklearn")
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from softxent import SoftmaxRegression  # noqa: E402


@parametrize_with_checks(
    [
        SoftmaxRegression(),
        SoftmaxRegression(solver="newton-cg", tol=1e-9),
        SoftmaxRegression(solver="gd", alpha=1.0, tol=1e-11, max_iter=5000),
        SoftmaxRegression(solver="proximal", l1_ratio=0.5, alpha=0.1, tol=1e-11, max_iter=5000),
        SoftmaxRegression(solver="sgd", max_iter=50, random_state=0),
        SoftmaxRegression(solver="adam", max_iter=50, random_state=0),
    ],
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
