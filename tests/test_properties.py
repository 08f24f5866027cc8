"""Property-based test (hypothesis) of torch's cross-entropy contract through the public API only.

Random batches in every layout torch's ``F.cross_entropy`` takes ((N, K), (N, K, T), (N, K, H, W)), with int64,
uint8 or probability targets, an ignore mask (or all-zero padding rows), invalid targets, rows of NaN/Inf logits and
logits up to 1e4, fed to a randomly configured :class:`LabelMatrix` and to :func:`adalabel_loss`. Invariants:

1. after ``update`` and ``refresh`` Q is finite, non-negative, row-stochastic, zero-diagonal when residual;
2. ignored, padding, invalid and non-finite positions change nothing: an engine fed only the clean positions,
   flattened to ``(M, K)`` rows with their class index, has the same statistics and the same Q; the invalid and
   non-finite positions are counted exactly;
3. the loss is finite on clean positions, 0 on ignored ones, NaN on invalid ones (with a finite gradient, zero
   there), NaN for a mean over no position (as ``F.cross_entropy``), and does not depend on the layout;
4. ``check_values`` names the number of invalid targets and accepts every other batch; ``count_unusable_logits``
   counts the valid positions with unusable logits, as the statistics do.

The positions' roles (clean / ignored / invalid / non-finite) are drawn by hypothesis as rates plus a seed, so that a
failing example shrinks to a few numbers that reproduce it exactly.
"""

import math
from dataclasses import dataclass
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_adalabel import PRESETS
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.losses import soft_label_loss
from lightning_adalabel.inputs import _format, check_values, count_unusable_logits

# Hypothesis draws hundreds of random batches per property.
pytestmark = pytest.mark.slow

# Every loss mode a preset uses, each with the alpha a preset could give it.
LOSS_MODES = {"decoupled": 1.0, "mixed": 0.3, "ce": 0.0}
assert set(LOSS_MODES) == {preset.loss for preset in PRESETS.values()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency (tens of ms per op on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Batch:
    """One drawn batch, both as the caller passes it and as the ground truth the test derives on its own."""

    logits: torch.Tensor  # (N, K, ...) as passed to the library
    target: torch.Tensor  # (N, ...) class indices or (N, K, ...) probabilities, as passed
    ignore_index: int
    flat_logits: torch.Tensor  # (M, K), one row per position in F.cross_entropy's order (N, d1, ..., dk)
    flat_target: torch.Tensor  # (M,) int64 class indices or (M, K) probabilities
    classes: torch.Tensor  # (M,) the class a clean position belongs to (argmax for probabilities), else 0
    ignored: torch.Tensor  # (M,) bool: ignore_index or an all-zero probability row
    invalid: torch.Tensor  # (M,) bool: neither a class nor ignore_index, or not a distribution
    finite: torch.Tensor  # (M,) bool: the logits row is finite

    @property
    def probabilistic(self) -> bool:
        return self.target.is_floating_point()

    @property
    def valid(self) -> torch.Tensor:
        return ~self.ignored & ~self.invalid

    @property
    def clean(self) -> torch.Tensor:
        return self.valid & self.finite

    def layout(self, flat: torch.Tensor) -> torch.Tensor:
        """(M, K) rows -> (N, K, ...) in this batch's layout, differentiably."""
        shape = (self.logits.shape[0], *self.logits.shape[2:], self.logits.shape[1])
        return flat.reshape(shape).movedim(-1, 1)


SPATIAL = {"(N, K)": 0, "(N, K, T)": 1, "(N, K, H, W)": 2}


@st.composite
def batches(draw, num_classes: int) -> Batch:
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(SPATIAL[draw(st.sampled_from(list(SPATIAL)))]))
    n = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["int64", "uint8", "probabilities"]))
    if kind == "int64":
        ignore_index = draw(st.sampled_from([-100, -1, 255]))
    elif kind == "uint8":  # uint8 cannot hold -100
        ignore_index = draw(st.sampled_from([255, 100]))
    else:  # not used by probability targets (torch ignores it there too)
        ignore_index = -100
    ignore_rate = draw(st.sampled_from([0.0, 0.3, 0.3, 1.0]))
    invalid_rate = draw(st.sampled_from([0.0, 0.2]))
    nonfinite_rate = draw(st.sampled_from([0.0, 0.0, 0.2, 1.0]))
    scale = draw(st.sampled_from([0.0, 1.0, 30.0, 1e4]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))
    contiguous = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))

    generator = torch.Generator().manual_seed(seed)
    k, m = num_classes, n * math.prod(spatial)

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    def pick(values: List[int]) -> torch.Tensor:
        return torch.tensor(values)[torch.randint(len(values), (m,), generator=generator)]

    ignored = rand(m) < ignore_rate
    invalid = ~ignored & (rand(m) < invalid_rate)
    flat_logits = scale * torch.randn(m, k, generator=generator)
    nonfinite = rand(m) < nonfinite_rate
    how = torch.randint(5, (m,), generator=generator)
    column = torch.randint(k, (m,), generator=generator)

    classes = torch.randint(k, (m,), generator=generator)
    if kind == "probabilities":
        rows = (torch.randn(m, k, generator=generator) * 3).softmax(dim=1)
        one_hot = rand(m) < 0.2  # hard labels given as probabilities
        rows = torch.where(one_hot[:, None], F.one_hot(classes, k).float(), rows)
        rows[ignored] = 0.0  # padding
        # Not distributions: negated, tripled, halved, or summing to 1 with a negative entry.
        broken = torch.randint(4, (m,), generator=generator)
        shift = torch.roll(F.one_hot(classes, k).float(), 1, dims=1)
        signed = 2 * F.one_hot(classes, k).float() - shift
        bad = torch.stack([-rows, 3 * rows, 0.5 * rows, signed])[broken, torch.arange(m)]
        rows = torch.where(invalid[:, None], bad, rows).to(dtype)
        flat_target = rows
        classes = torch.where(ignored | invalid, 0, rows.argmax(dim=1))
        target_shape = (n, *spatial, k)
    else:
        if kind == "int64":
            wrong = [k, k + 1, 1000, -1, -2, -101, 255]
        else:
            wrong = [k, 7, 100, 200, 254, 255]
        wrong = pick([value for value in wrong if value != ignore_index])
        flat_target = torch.where(ignored, ignore_index, torch.where(invalid, wrong, classes))
        classes = torch.where(ignored | invalid, 0, classes)
        target_shape = (n, *spatial)
    # Unusable rows: all NaN, all +/-Inf, a single +Inf entry, or -Inf at the target class (the dominant class of a
    # probability row); anywhere (clean, ignored or invalid positions). -Inf at another class is a mask, which is
    # usable: tests/test_lightning_loops.py and tests/test_fused.py cover it.
    inf = float("inf")
    for row in torch.nonzero(nonfinite).flatten().tolist():
        kind_of_row, j = int(how[row]), int(column[row])
        if kind_of_row == 0:
            flat_logits[row] = float("nan")
        elif kind_of_row in (1, 2):
            flat_logits[row] = inf if kind_of_row == 1 else -inf
        elif kind_of_row == 3:
            flat_logits[row, j] = inf
        else:
            flat_logits[row, classes[row]] = -inf
    flat_logits = flat_logits.to(dtype)
    finite = torch.isfinite(flat_logits).all(dim=1)

    target = flat_target.reshape(target_shape)
    if kind == "probabilities":
        target = target.movedim(-1, 1)
    elif kind == "uint8":
        target = target.to(torch.uint8)
    logits = flat_logits.reshape(n, *spatial, k).movedim(-1, 1)  # non-contiguous unless (N, K)
    if contiguous:
        logits, target = logits.contiguous(), target.contiguous()
    return Batch(logits, target, ignore_index, flat_logits, flat_target, classes, ignored, invalid, finite)


@st.composite
def scenarios(draw) -> Tuple[int, dict, List[List[Batch]]]:
    k = draw(st.integers(2, 7))
    config = dict(
        samples=draw(st.sampled_from(["misclassified", "all", "correct"])),
        estimator=draw(st.sampled_from(["mean", "geometric", "confusion"])),
        momentum=draw(st.sampled_from([1.0, 0.3])),
        include_diagonal=draw(st.booleans()),
    )
    rounds = draw(st.lists(st.lists(batches(k), min_size=1, max_size=2), min_size=1, max_size=2))
    return k, config, rounds


def assert_label_matrix(q: torch.Tensor, k: int, include_diagonal: bool) -> None:
    assert q.shape == (k, k) and q.dtype == torch.float32
    assert torch.isfinite(q).all(), q
    assert (q >= 0).all(), q
    torch.testing.assert_close(q.sum(dim=1), torch.ones(k), rtol=0, atol=1e-5)
    if not include_diagonal:
        assert (q.diagonal() == 0).all(), q


def check_engine(k: int, config: dict, rounds: List[List[Batch]]) -> LabelMatrix:
    engine, reference = LabelMatrix(k, **config), LabelMatrix(k, **config)
    assert_label_matrix(engine.matrix, k, config["include_diagonal"])
    for batches_of_round in rounds:
        expected_invalid = expected_nonfinite = 0
        expected_nonfinite_per_class = torch.zeros(k)
        for batch in batches_of_round:
            engine.update(batch.logits, batch.target, ignore_index=batch.ignore_index)
            # The same statistics from the clean positions alone, as (M, K) rows with their class index.
            clean = batch.clean
            reference.update(batch.flat_logits[clean], batch.classes[clean])
            expected_invalid += int(batch.invalid.sum())
            lost = batch.valid & ~batch.finite
            expected_nonfinite += int(lost.sum())
            expected_nonfinite_per_class += torch.bincount(batch.classes[lost], minlength=k).float()
        torch.testing.assert_close(engine.counts, reference.counts, rtol=0, atol=0)
        torch.testing.assert_close(engine.sums, reference.sums, rtol=1e-5, atol=1e-6)
        assert engine.invalid.sum().item() == expected_invalid
        assert engine.nonfinite.sum().item() == expected_nonfinite
        torch.testing.assert_close(engine.nonfinite, expected_nonfinite_per_class, rtol=0, atol=0)
        # Seen: every valid position of its class, finite or not; never an ignored or invalid one.
        torch.testing.assert_close(engine.seen, reference.seen + engine.nonfinite, rtol=0, atol=0)
        engine.refresh()
        reference.refresh()
        assert_label_matrix(engine.matrix, k, config["include_diagonal"])
        torch.testing.assert_close(engine.matrix, reference.matrix, rtol=1e-5, atol=1e-6)
        assert engine.accumulator.abs().sum() == 0
    return engine


def check_loss(q_residual: torch.Tensor, q_mixed: torch.Tensor, batch: Batch) -> None:
    all_finite = bool(batch.finite.all())
    any_invalid = bool(batch.invalid.any())
    zero = batch.ignored  # ignore_index or padding: 0 under "none", whatever the logits
    for mode, alpha in LOSS_MODES.items():
        q = q_residual if mode == "decoupled" else q_mixed
        for reduction in ("none", "mean"):
            flat = batch.flat_logits.clone().requires_grad_()
            loss = soft_label_loss(batch.layout(flat), batch.target, q, mode, alpha, batch.ignore_index, reduction)
            where = f"mode={mode}, reduction={reduction}"
            if reduction == "none":
                assert loss.shape == (batch.logits.shape[0], *batch.logits.shape[2:]), where
                values = loss.detach().reshape(-1).double()
                assert (values[zero] == 0).all(), where
                assert values[batch.invalid].isnan().all(), where
                assert torch.isfinite(values[batch.clean]).all(), where
                # Layout-independent: the same per-position values from the flattened clean rows.
                clean = batch.clean
                if clean.any():
                    rows = soft_label_loss(batch.flat_logits[clean], batch.flat_target[clean], q, mode, alpha,
                                         batch.ignore_index, "none")
                    torch.testing.assert_close(values[clean], rows.double(), rtol=1e-5, atol=1e-5, msg=where)
            else:
                assert loss.shape == (), where
                if any_invalid:
                    assert loss.isnan(), where  # loud, and the callback raises at the next refresh
                elif all_finite or bool(batch.finite[batch.valid].all()):
                    if batch.probabilistic or bool(batch.valid.any()):
                        assert torch.isfinite(loss), where
                        # A mean over the positions that are not ignored, or over all of them for probabilities.
                        count = len(values) if batch.probabilistic else int(batch.valid.sum())
                        torch.testing.assert_close(loss.detach().double(), values.sum() / count, rtol=1e-5,
                                                   atol=1e-5, msg=where)
                    else:  # a mean over no position, as F.cross_entropy
                        assert loss.isnan(), where
            if all_finite:
                (gradient,) = torch.autograd.grad(loss.sum(), flat)
                assert torch.isfinite(gradient).all(), where
                assert (gradient[batch.ignored | batch.invalid] == 0).all(), where
            # torch knows no padding rows: NaN logits there make its loss NaN, ours 0.
            if mode == "ce" and not any_invalid and (all_finite or not batch.probabilistic):
                # The library computes in float32 at least (float64 stays float64).
                logits = batch.logits if batch.logits.dtype == torch.float64 else batch.logits.float()
                target = batch.target.to(logits.dtype) if batch.probabilistic else batch.target.long()
                expected = F.cross_entropy(logits, target, ignore_index=batch.ignore_index, reduction=reduction)
                torch.testing.assert_close(loss.detach(), expected, equal_nan=True, msg=where)


def check_eager(batch: Batch) -> None:
    num_invalid = int(batch.invalid.sum())
    if num_invalid:
        with pytest.raises(ValueError, match=rf"^{num_invalid} of {len(batch.invalid)} "):
            check_values(batch.logits, batch.target, batch.ignore_index)
    else:  # unusable logits are counted and warned about by the callback, not refused
        check_values(batch.logits, batch.target, batch.ignore_index)
    formatted = _format(batch.logits, batch.target, batch.ignore_index)
    assert int(count_unusable_logits(formatted)) == int((batch.valid & ~batch.finite).sum())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_engine_loss_and_checks_on_random_batches(scenario):
    k, config, rounds = scenario
    engine = check_engine(k, config, rounds)
    q_residual = engine.matrix if not config["include_diagonal"] else initial_label_matrix(k)
    for batch in (batch for batches_of_round in rounds for batch in batches_of_round):
        event(f"targets {'probabilities' if batch.probabilistic else batch.target.dtype}, logits {batch.logits.ndim}-d")
        event(f"logits {batch.logits.dtype}")
        event("batch: " + ("with invalid targets" if batch.invalid.any() else "no valid position"
                           if not batch.valid.any() else "non-finite logits" if not batch.finite.all() else "clean"))
        check_loss(q_residual, engine.matrix, batch)
        check_eager(batch)


# ---- regressions (issue 8) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(LOSS_MODES))
def test_uint8_targets_with_n_equal_to_k_are_class_indices_not_a_mask(mode):
    k = 4
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(k, k, generator=generator)
    target = torch.tensor([3, 0, 1, 1], dtype=torch.uint8)
    q = initial_label_matrix(k) if mode == "decoupled" else initial_label_matrix(k, include_diagonal=True)
    alpha = LOSS_MODES[mode]
    for reduction in ("none", "mean"):
        loss = soft_label_loss(logits, target, q, mode, alpha, reduction=reduction)
        torch.testing.assert_close(loss, soft_label_loss(logits, target.long(), q, mode, alpha, reduction=reduction))
        if mode == "ce":
            torch.testing.assert_close(loss, F.cross_entropy(logits, target.long(), reduction=reduction))
    engine, reference = LabelMatrix(k, samples="all"), LabelMatrix(k, samples="all")
    engine.update(logits, target)
    reference.update(logits, target.long())
    torch.testing.assert_close(engine.accumulator, reference.accumulator, rtol=0, atol=0)


def test_probability_targets_times_three_are_invalid():
    k, n = 3, 5
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, 2, generator=generator)
    target = 3 * torch.randn(n, k, 2, generator=generator).softmax(dim=1)
    engine = LabelMatrix(k, samples="all")
    engine.update(logits, target)
    assert engine.invalid.sum().item() == n * 2
    assert engine.counts.sum().item() == 0 and engine.seen.sum().item() == 0
    engine.refresh()
    torch.testing.assert_close(engine.matrix, initial_label_matrix(k), rtol=0, atol=0)
    for mode, alpha in LOSS_MODES.items():
        assert soft_label_loss(logits, target, initial_label_matrix(k), mode, alpha).isnan()
    with pytest.raises(ValueError, match=rf"^{n * 2} of {n * 2} probability targets are not distributions"):
        check_values(logits, target)
    # Divided by 3 again, they are distributions.
    check_values(logits, target / 3)


@pytest.mark.parametrize("mode", ["decoupled", "mixed"])
@pytest.mark.parametrize(
    "logits_dtype, target_dtype",
    [(torch.float64, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float64)],
    ids=["f64-f64", "f64-f32", "f32-f64"],
)
def test_float64_probability_targets_with_the_engines_float32_label_matrix(mode, logits_dtype, target_dtype):
    # F.cross_entropy takes these dtypes; LabelMatrix.matrix is float32 (the callback passes it as is).
    logits = torch.zeros(1, 2, dtype=logits_dtype)
    target = torch.tensor([[1.0, 0.0]], dtype=target_dtype)
    q = LabelMatrix(2).matrix
    loss = soft_label_loss(logits, target, q, mode, 0.5)
    # A one-hot probability target gives the loss of its class.
    expected = soft_label_loss(logits, torch.tensor([0]), q, mode, 0.5)
    torch.testing.assert_close(loss, expected, check_dtype=False)
