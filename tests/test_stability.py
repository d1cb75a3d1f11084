"""The FP32 stability experiment (paper Table 5): exact minimum, Swift-SVD at it, SVD-LLM shifted on singular G."""

from __future__ import annotations

import pytest
import torch
from stability import (
    PAPER_TABLE5,
    SETTINGS,
    loss,
    minimum_loss,
    random_problem,
    stability_row,
    stability_table,
    swift_fp32,
)

from swiftsvd_cli.core.linalg import uniform_rank


@pytest.mark.parametrize("setting", SETTINGS)
def test_problems_are_float32_and_reproducible(setting: str) -> None:
    W, X = random_problem(32, setting, seed=1)
    assert W.dtype == X.dtype == torch.float32
    assert W.shape == (32, 32) and X.shape[0] == 32
    assert torch.equal(X, random_problem(32, setting, seed=1)[1])


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown setting"):
        random_problem(8, "uniform")


def test_minimum_is_the_singular_value_tail_of_w_when_x_is_identity() -> None:
    W = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert minimum_loss(W, torch.eye(4), 2) == pytest.approx((2.0**2 + 1.0**2) ** 0.5)


def test_no_rank_k_matrix_beats_the_minimum() -> None:
    W, X = random_problem(24, "gaussian")
    k = uniform_rank(24, 24, 0.6)
    U, _, _ = torch.linalg.svd(W.double())
    truncated = U[:, :k] @ U[:, :k].T @ W.double()  # optimal for ‖W − W'‖, not for ‖(W − W') X‖
    assert loss(W, truncated, X) >= minimum_loss(W, X, k)
    assert loss(W, swift_fp32(W, X @ X.T, k), X) == pytest.approx(minimum_loss(W, X, k), rel=1e-5)


@pytest.mark.parametrize("setting", SETTINGS)
def test_swift_reaches_the_minimum_to_fp32_precision(setting: str) -> None:
    row = stability_row(48, setting)
    assert row.rank == uniform_rank(48, 48, 0.6)
    assert abs(row.swift_relative) < 1e-5


def test_svd_llm_shift_costs_accuracy_on_a_singular_gram() -> None:
    row = stability_row(48, "rank-deficient")
    assert row.svd_llm_shifted
    assert row.svd_llm_gap > 100 * abs(row.swift_gap)


def test_table_rows_and_paper_numbers() -> None:
    rows = stability_table([16, 128], settings=("gaussian", "ill-conditioned"))
    assert [(r.setting, r.size) for r in rows] == [
        ("gaussian", 16),
        ("gaussian", 128),
        ("ill-conditioned", 16),
        ("ill-conditioned", 128),
    ]
    assert rows[1].paper_minimum == PAPER_TABLE5[128][0] and rows[1].paper_svd_llm_gap == PAPER_TABLE5[128][1]
    assert rows[0].paper_minimum is None and rows[3].paper_minimum is None  # paper numbers are for its setting only
    assert {"swift_relative", "svd_llm_relative", "minimum"} <= set(rows[0].to_dict())


def test_svd_llm_failure_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import stability

    def failing(*_args: object, **_kwargs: object) -> None:
        raise torch.linalg.LinAlgError("not positive-definite")

    monkeypatch.setattr(stability, "svd_llm_factors", failing)
    row = stability_row(16, "gaussian")
    assert row.svd_llm_failed and row.svd_llm_gap is None and row.svd_llm_relative is None
    assert abs(row.swift_relative) < 1e-5
