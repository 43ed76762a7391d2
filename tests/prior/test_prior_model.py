"""The prior's transformer (plain PyTorch): shapes, per-position logits, the KV cache, guidance, files."""

from __future__ import annotations

import pytest
import torch

from revq_ray.prior.model import PriorSpec, PriorTransformer

pytestmark = pytest.mark.core

T, K, C = 7, 5, 3


def _model(embedding: str = "table", head: str = "shared", seed: int = 0, **kw) -> PriorTransformer:
    torch.manual_seed(seed)
    spec = PriorSpec(
        tokens=T,
        codebook_size=K,
        num_classes=C,
        d_model=32,
        layers=2,
        heads=4,
        embedding=embedding,
        head=head,
        code_dim=3,
        **kw,
    )
    cb = torch.randn(T, K, 3, generator=torch.Generator().manual_seed(9))
    return PriorTransformer(spec, cb).eval()


VARIANTS = [
    ("table", "shared"),
    ("table", "per_position"),
    ("codebook", "shared"),
    ("codebook", "per_position"),
]


@pytest.mark.parametrize("embedding,head", VARIANTS)
def test_shapes_and_causality(embedding, head):
    m = _model(embedding, head)
    ids = torch.randint(0, K, (4, T))
    labels = torch.tensor([0, 1, 2, C])  # C = the null class
    logits = m(ids, labels)
    assert logits.shape == (4, T, K)  # K logits per position: codebook t's codes, never T*K
    # Causal: changing x[t] changes no logit at positions <= t (slot t+1 is the first to see it).
    ids2 = ids.clone()
    ids2[:, 3] = (ids2[:, 3] + 1) % K
    logits2 = m(ids2, labels)
    torch.testing.assert_close(logits[:, :4], logits2[:, :4])
    assert not torch.allclose(logits[:, 4:], logits2[:, 4:])
    # The class prefix reaches every position.
    assert not torch.allclose(
        m(ids, torch.tensor([1, 1, 1, 1]))[:, 0], m(ids, torch.tensor([2, 2, 2, 2]))[:, 0]
    )
    loss, acc = m.loss(ids, labels)
    assert loss.ndim == 0 and 0 <= float(acc) <= 1


def test_the_embedding_depends_on_the_position_not_only_the_code():
    """Code k of codebook 2 and code k of codebook 5 are different inputs (per-position codebooks)."""
    for emb in ("table", "codebook"):
        m = _model(emb)
        k = torch.tensor([[1]])
        assert not torch.allclose(m.embed_tokens(k, torch.tensor([2])), m.embed_tokens(k, torch.tensor([5])))


def test_per_position_head_scores_each_position_with_its_own_weights():
    m = _model(head="per_position")
    h = torch.randn(1, 1, 32)
    assert not torch.allclose(m.logits_at(h, torch.tensor([0])), m.logits_at(h, torch.tensor([1])))
    with torch.no_grad():
        m.head_w[4].zero_()
        m.head_b[4].fill_(0.5)
    assert torch.equal(m.logits_at(h, torch.tensor([4])), torch.full((1, 1, K), 0.5))


@pytest.mark.parametrize("embedding,head", VARIANTS)
@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_kv_cache_sampling_equals_full_prefix_sampling(embedding, head, guidance):
    m = _model(embedding, head)
    labels = torch.tensor([0, 1, 2, 0, C])
    for top_k, temp in ((0, 1.0), (3, 0.8)):
        a, la = m.generate(
            labels,
            temperature=temp,
            top_k=top_k,
            guidance=guidance,
            generator=torch.Generator().manual_seed(4),
            return_logits=True,
        )
        b, lb = m.generate_full_prefix(
            labels,
            temperature=temp,
            top_k=top_k,
            guidance=guidance,
            generator=torch.Generator().manual_seed(4),
            return_logits=True,
        )
        assert torch.equal(a, b)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        # ... and the logits are the teacher-forced ones of the drawn ids (the cache changes nothing)
        if guidance == 1.0:
            torch.testing.assert_close(la, m(a, labels), rtol=1e-5, atol=1e-5)
    assert a.shape == (5, T) and int(a.min()) >= 0 and int(a.max()) < K


def test_guidance_mixes_conditional_and_unconditional_logits():
    m = _model()
    labels = torch.tensor([0, 2])
    s = 3.0
    _, guided = m.generate(labels, guidance=s, temperature=0, return_logits=True)
    ids = guided.argmax(-1)  # temperature 0: the argmax of the guided logits
    cond = m(ids, labels)
    uncond = m(ids, torch.full_like(labels, C))
    torch.testing.assert_close(guided, uncond + s * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_label_dropout_for_classifier_free_guidance():
    m = _model(cfg_dropout=0.3)
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = m.drop_labels(labels, torch.Generator().manual_seed(0))
    share = float((dropped == C).float().mean())
    assert 0.28 < share < 0.32 and set(dropped.unique().tolist()) == {0, C}
    m0 = PriorTransformer(PriorSpec(tokens=T, codebook_size=K, num_classes=0, d_model=16, layers=1, heads=2))
    assert set(m0.drop_labels(labels[:5]).tolist()) == {0}  # unconditional: only the null class (id 0)


def test_sampling_is_reproducible_and_top_k_restricts_the_draw():
    m = _model()
    labels = torch.tensor([1, 1, 1])
    a = m.generate(labels, generator=torch.Generator().manual_seed(1))
    b = m.generate(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    _, logits = m.generate(labels, top_k=1, generator=torch.Generator().manual_seed(2), return_logits=True)
    ids = m.generate(labels, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ids, logits.argmax(-1))  # top-1 = greedy


def test_bad_ids_and_labels_are_refused():
    m = _model()
    with pytest.raises(ValueError, match=r"ids must lie in \[0, K=5\)"):
        m(torch.full((1, T), K), torch.tensor([0]))
    with pytest.raises(ValueError, match="labels must lie in"):
        m(torch.zeros(1, T, dtype=torch.long), torch.tensor([C + 1]))


@pytest.mark.parametrize("embedding,head", VARIANTS)
def test_save_and_load(tmp_path, embedding, head):
    m = _model(embedding, head)
    m.meta = {"class_names": ["a", "b", "c"]}
    m.save_pretrained(tmp_path / "p")
    again = PriorTransformer.from_pretrained(tmp_path / "p")
    ids, labels = torch.randint(0, K, (2, T)), torch.tensor([0, 2])
    torch.testing.assert_close(m(ids, labels), again(ids, labels))
    assert again.meta == {"class_names": ["a", "b", "c"]} and again.spec == m.spec
