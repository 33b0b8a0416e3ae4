"""The language-model parity report: KL divergence of the next-token distributions, and the
thresholds of :func:`qat.export.check_lm_parity`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qat.export.verify import ParityError
from qat.export.verify_lm import (
    DEFAULT_MAX_KL,
    DEFAULT_MAX_PPL_REL_DIFF,
    DEFAULT_MIN_AGREEMENT,
    _kl_sum,
    check_lm_parity,
)


def test_kl_sum_is_kl_of_the_reference_to_the_runtime_summed_over_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 11, generator=gen)
    out = ref + 0.3 * torch.randn(2, 5, 11, generator=gen)
    want = F.kl_div(
        F.log_softmax(out.double(), -1),
        F.log_softmax(ref.double(), -1),
        log_target=True,
        reduction="sum",
    )
    assert _kl_sum(ref, out) == pytest.approx(float(want), rel=1e-12)
    assert _kl_sum(ref, ref) == 0.0
    assert _kl_sum(ref, ref + 5.0) == pytest.approx(0.0, abs=1e-12)  # a shift is no change


def _report(agreement: float, ppl_rel: float, kl: float | None) -> dict:
    r = {"agreement": agreement, "perplexity": 3.0, "ppl_rel_diff": ppl_rel}
    if kl is not None:
        r["mean_kl"] = kl
    return {"num_tokens": 100, "runtimes": {"onnx": r}}


def test_check_lm_parity_defaults_and_each_limit() -> None:
    assert (DEFAULT_MIN_AGREEMENT, DEFAULT_MAX_PPL_REL_DIFF, DEFAULT_MAX_KL) == (0.999, 1e-3, 1e-4)
    check_lm_parity(_report(0.999, 1e-3, 1e-4))
    check_lm_parity(_report(1.0, 0.0, None))  # a report from before mean_kl
    with pytest.raises(ParityError, match=r"onnx: mean KL divergence .* 0.0002 nats > 0.0001"):
        check_lm_parity(_report(1.0, 0.0, 2e-4))
    with pytest.raises(ParityError, match=r"differs by 0\.200%.*allowed 0\.100%"):
        check_lm_parity(_report(1.0, 2e-3, 0.0))
    with pytest.raises(ParityError, match=r"agreement 99\.8000% < 99\.9000%"):
        check_lm_parity(_report(0.998, 0.0, 0.0))
    check_lm_parity(_report(1.0, 0.0, 2e-4), max_kl=1e-3)
    with pytest.raises(ValueError, match=r"max_kl=-1 is invalid"):
        check_lm_parity(_report(1.0, 0.0, 0.0), max_kl=-1)
