"""Losses of Tursun et al. (2022) and DSN: hand-computed cases, reference loops and gradcheck."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from zsbir_export import losses as L  # noqa: E402

pytestmark = pytest.mark.torch


def t(x: object, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- quadruplet


def test_quadruplet_hand_case() -> None:
    a, p = t([[0.0, 0.0]]), t([[1.0, 0.0]])  # d(a,p) = 1
    n_photo, n_sketch = t([[0.0, 2.0]]), t([[0.5, 0.0]])  # d = 2 and 0.5
    # 0.5 * (relu(1 - 2 + 0.2) + relu(1 - 0.5 + 0.2)) = 0.5 * 0.7
    out = L.domain_balanced_quadruplet_loss(a, p, n_photo, n_sketch, margin=0.2)
    assert out.item() == pytest.approx(0.35)
    # both negatives far: zero loss; margin is honoured
    out = L.domain_balanced_quadruplet_loss(a, p, t([[0.0, 3.0]]), t([[3.0, 0.0]]), margin=0.2)
    assert out.item() == 0.0
    per = L.domain_balanced_quadruplet_loss(
        torch.cat([a, a]), torch.cat([p, p]), t([[0.0, 2.0], [0.0, 0.0]]), t([[0.5, 0.0], [0.0, 5.0]]), reduction="none"
    )
    # second row: d(a,n_photo)=0 -> relu(1-0+0.2)=1.2 ; n_sketch far -> 0 ; half of 1.2
    assert per.tolist() == pytest.approx([0.35, 0.6])


def test_quadruplet_is_domain_balanced() -> None:
    """Swapping which negative is a photo and which a sketch gives the same loss."""
    g = torch.Generator().manual_seed(0)
    a, p, n1, n2 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(4))
    x = L.domain_balanced_quadruplet_loss(a, p, n1, n2)
    y = L.domain_balanced_quadruplet_loss(a, p, n2, n1)
    assert x.item() == pytest.approx(y.item())


def test_quadruplet_errors() -> None:
    a = t([[0.0, 0.0]])
    with pytest.raises(ValueError, match="shape"):
        L.domain_balanced_quadruplet_loss(a, t([[0.0, 0.0, 0.0]]), a, a)
    with pytest.raises(ValueError, match="margin"):
        L.domain_balanced_quadruplet_loss(a, a, a, a, margin=-1)
    with pytest.raises(ValueError, match="reduction"):
        L.domain_balanced_quadruplet_loss(a, a, a, a, reduction="max")


def _reference_batch_hard(sk, sl, ph, pl, margin):  # type: ignore[no-untyped-def]
    terms = []
    for i in range(sk.shape[0]):
        pos = [j for j in range(ph.shape[0]) if pl[j] == sl[i]]
        negp = [j for j in range(ph.shape[0]) if pl[j] != sl[i]]
        negs = [j for j in range(sk.shape[0]) if sl[j] != sl[i]]
        if not (pos and negp and negs):
            continue
        d = lambda u, v: math.dist(u.tolist(), v.tolist())  # noqa: E731
        dap = max(d(sk[i], ph[j]) for j in pos)
        danp = min(d(sk[i], ph[j]) for j in negp)
        dans = min(d(sk[i], sk[j]) for j in negs)
        terms.append(0.5 * (max(0.0, dap - danp + margin) + max(0.0, dap - dans + margin)))
    return sum(terms) / len(terms)


def test_batch_quadruplet_matches_reference_loop() -> None:
    g = torch.Generator().manual_seed(1)
    sk = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ph = torch.randn(6, 3, generator=g, dtype=torch.float64)
    sl = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 has no photo -> skipped
    pl = torch.tensor([0, 1, 1, 2, 2, 0])
    got = L.batch_quadruplet_loss(sk, sl, ph, pl, margin=0.5, mining="hard")
    assert got.item() == pytest.approx(_reference_batch_hard(sk, sl, ph, pl, 0.5))


def test_batch_quadruplet_random_and_degenerate() -> None:
    g = torch.Generator().manual_seed(2)
    sk = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    ph = torch.randn(4, 3, dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 1])
    r = L.batch_quadruplet_loss(sk, lab, ph, lab, mining="random", generator=g)
    hard = L.batch_quadruplet_loss(sk, lab, ph, lab, mining="hard")
    assert 0.0 <= r.item() <= hard.item() + 1e-12  # batch-hard upper-bounds any choice
    # one class only: no valid anchor -> 0, still differentiable
    z = L.batch_quadruplet_loss(sk, torch.zeros(4, dtype=torch.long), ph, torch.zeros(4, dtype=torch.long))
    z.backward()
    assert z.item() == 0.0 and sk.grad is not None
    with pytest.raises(ValueError, match="mining"):
        L.batch_quadruplet_loss(sk, lab, ph, lab, mining="semi")


def test_quadruplet_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    assert torch.autograd.gradcheck(lambda *x: L.domain_balanced_quadruplet_loss(*x, margin=1.0), args)
    sk = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ph = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda s, p: L.batch_quadruplet_loss(s, lab, p, lab, margin=1.0), (sk, ph))


# ---------------------------------------------------------------- classification / knowledge preservation


def test_classification_hand_case_and_errors() -> None:
    logits = t([[0.0, math.log(3.0)]])
    assert L.semantic_classification_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    with pytest.raises(ValueError, match="labels must lie"):
        L.semantic_classification_loss(logits, torch.tensor([2]))
    with pytest.raises(ValueError, match="labels must be"):
        L.semantic_classification_loss(logits, torch.tensor([0, 1]))


def test_class_mean_soft_targets_hand_case() -> None:
    logits = t([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(4.0)]])
    out = L.class_mean_soft_targets(logits, torch.tensor([0, 0, 1]), num_classes=2)
    assert out.tolist()[0] == pytest.approx([0.625, 0.375])
    assert out.tolist()[1] == pytest.approx([0.2, 0.8])
    # temperature 2 flattens: softmax([ln3/2, 0]) = [sqrt3/(1+sqrt3), 1/(1+sqrt3)]
    out2 = L.class_mean_soft_targets(logits[1:2], torch.tensor([0]), num_classes=1, temperature=2.0)
    s3 = math.sqrt(3.0)
    assert out2.tolist()[0] == pytest.approx([s3 / (1 + s3), 1 / (1 + s3)])
    with pytest.raises(ValueError, match="no photo for class"):
        L.class_mean_soft_targets(logits, torch.tensor([0, 0, 0]), num_classes=2)


def test_knowledge_preservation_hand_case() -> None:
    targets = t([[1.0, 0.0], [0.25, 0.75]])
    # student uniform: KL([1,0] || [.5,.5]) = ln 2 ; KL([.25,.75]||[.5,.5]) = .25 ln .5 + .75 ln 1.5
    got = L.knowledge_preservation_loss(t([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1]), targets)
    kl2 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert got.item() == pytest.approx((math.log(2) + kl2) / 2)
    # perfect student -> 0
    perfect = torch.log(t([[0.25, 0.75]]))
    assert L.knowledge_preservation_loss(perfect, torch.tensor([1]), targets).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="columns"):
        L.knowledge_preservation_loss(t([[0.0, 0.0, 0.0]]), torch.tensor([0]), targets)


def test_knowledge_preservation_gradcheck() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = L.class_mean_soft_targets(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.arange(6) % 2, 2)
    lab = torch.tensor([0, 1, 1, 0, 1])
    assert torch.autograd.gradcheck(
        lambda z: L.knowledge_preservation_loss(z, lab, targets, temperature=2.0), (logits,)
    )
    assert torch.autograd.gradcheck(lambda z: L.semantic_classification_loss(z, lab), (logits,))


# ---------------------------------------------------------------- DSN


def test_supcon_hand_case() -> None:
    T = 0.5
    feats = t([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])  # [3, 1 view, 2]
    labels = torch.tensor([0, 0, 1])
    # anchor 0: positive 1 (sim 0) against {1 (0), 2 (1/T)} ; anchor 1: positive 0 against {0, 2} (both 0)
    expect = (math.log(1 + math.exp(1 / T)) + math.log(2)) / 2
    got = L.supervised_contrastive_loss(feats, labels, temperature=T, base_temperature=T)
    assert got.item() == pytest.approx(expect)
    # temperature / base_temperature scales the loss
    got2 = L.supervised_contrastive_loss(feats, labels, temperature=T, base_temperature=2 * T)
    assert got2.item() == pytest.approx(expect / 2)


def _reference_supcon(feats, labels, T):  # type: ignore[no-untyped-def]
    n, v, _ = feats.shape
    vecs = [feats[i, k] for k in range(v) for i in range(n)]
    labs = [int(labels[i]) for k in range(v) for i in range(n)]
    per = []
    for a in range(len(vecs)):
        denom = sum(math.exp(float(vecs[a] @ vecs[j]) / T) for j in range(len(vecs)) if j != a)
        pos = [j for j in range(len(vecs)) if j != a and labs[j] == labs[a]]
        if pos:
            per.append(sum(float(vecs[a] @ vecs[j]) / T - math.log(denom) for j in pos) / len(pos))
    return -sum(per) / len(per)


def test_supcon_matches_reference_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.nn.functional.normalize(torch.randn(5, 2, 4, generator=g, dtype=torch.float64), dim=2)
    lab = torch.tensor([0, 1, 0, 2, 1])
    got = L.supervised_contrastive_loss(f, lab, temperature=0.2, base_temperature=0.2)
    assert got.item() == pytest.approx(_reference_supcon(f, lab, 0.2))
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.supervised_contrastive_loss(x, lab, temperature=0.3), (f,))
    with pytest.raises(ValueError, match="views"):
        L.supervised_contrastive_loss(f[:, 0], lab)


def test_memory_bank_fill_replace_and_loss() -> None:
    bank = L.CategoryMemoryBank(num_classes=2, topk=2, dim=2)
    photos, plab = t([[1.0, 0.0]], torch.float32), torch.tensor([0])
    bank.add(t([[0.0, 1.0], [1.0, 1.0]], torch.float32), torch.tensor([0, 0]), photos, plab)
    assert bank.counts.tolist() == [2, 0] and bank.used_fraction() == 0.5
    # full: a sketch closer to the photo query (1,0) than the worst entry (0,1) replaces it
    bank.add(t([[2.0, 0.1]], torch.float32), torch.tensor([0]), photos, plab)
    assert bank.embeds[0].tolist() == [[2.0, pytest.approx(0.1)], [1.0, 1.0]]
    # a farther one does not
    bank.add(t([[-1.0, 0.0]], torch.float32), torch.tensor([0]), photos, plab)
    assert bank.embeds[0, 0, 0].item() == 2.0
    # no photo of the class in the batch -> no replacement
    bank.add(t([[5.0, 0.0]], torch.float32), torch.tensor([0]), photos, torch.tensor([1]))
    assert bank.embeds[0, 0, 0].item() == 2.0
    centers, filled = bank.centers()
    assert filled.tolist() == [True, False]
    assert centers[0].tolist() == pytest.approx([1.5, 0.55])
    # loss: photo (1,0) vs centre (1.5, .55); the class-1 photo has no centre and is ignored
    q = t([[1.0, 0.0], [0.0, 1.0]], torch.float32)
    got = L.memory_loss(q, torch.tensor([0, 1]), centers, filled)
    assert got.item() == pytest.approx(1 - 1.5 / math.hypot(1.5, 0.55), rel=1e-6)
    empty = L.CategoryMemoryBank(2, 2, 2)
    c, f = empty.centers()
    assert L.memory_loss(q, torch.tensor([0, 1]), c, f).item() == 0.0
    state = bank.state_dict()
    bank.flush()
    assert bank.used_fraction() == 0.0
    bank.load_state_dict(state)
    assert bank.counts.tolist() == [2, 0]


def test_memory_loss_gradcheck() -> None:
    g = torch.Generator().manual_seed(6)
    centers = torch.randn(3, 4, generator=g, dtype=torch.float64)
    filled = torch.tensor([True, False, True])
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 2, 2, 0])
    assert torch.autograd.gradcheck(lambda z: L.memory_loss(z, lab, centers, filled), (x,))


def test_sake_distillation_hand_case() -> None:
    s = t([[math.log(3.0), 0.0], [0.0, 0.0]])  # student probs [.75,.25] and [.5,.5]
    teacher = t([[0.0, 0.0], [0.0, 0.0]])
    cmask = t([[1.0, 0.0], [0.0, 0.0]])
    # sample 0 target softmax([0.3, 0]) ; sample 1 target [.5, .5]
    q = 1 / (1 + math.exp(-0.3))
    ce0 = -(q * math.log(0.75) + (1 - q) * math.log(0.25))
    ce1 = math.log(2)
    both = L.sake_distillation_loss(s, teacher, mask=None, class_mask=cmask, kdneg_lambda=0.3)
    assert both.item() == pytest.approx((ce0 + ce1) / 2)
    only0 = L.sake_distillation_loss(s, teacher, mask=t([1.0, 0.0]), class_mask=cmask, kdneg_lambda=0.3)
    assert only0.item() == pytest.approx(ce0)
    # kd_lambda scales the teacher logits (sharpening): teacher [ln 3, 0] with kd_lambda 2 -> [.9, .1]
    sharp = L.sake_distillation_loss(s[:1], t([[math.log(3.0), 0.0]]), kd_lambda=2.0)
    assert sharp.item() == pytest.approx(-(0.9 * math.log(0.75) + 0.1 * math.log(0.25)))
    assert L.sake_distillation_loss(s, teacher, mask=t([0.0, 0.0])).item() == 0.0
    with pytest.raises(ValueError, match="teacher logits"):
        L.sake_distillation_loss(s, teacher[:, :1])


def test_sake_distillation_gradcheck() -> None:
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64)
    cmask = torch.nn.functional.one_hot(torch.tensor([0, 2, 4, 1]), 5).double()
    mask = t([1.0, 0.0, 1.0, 1.0])
    assert torch.autograd.gradcheck(lambda z: L.sake_distillation_loss(z, teacher, mask, cmask), (s,))
