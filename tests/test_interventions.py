"""BaPA ids on hand-computed cases; AGCI against a hand computation; configs round trip."""
import math

import pytest
import torch

import interp
from interp import AGCI, BaPA, agci_inject, bapa_position_ids
from spatialbias.errors import SpatialBiasError
from interp.interventions import from_dict

T, I, P = 5, 9, 0  # text, image, pad token ids (values do not matter)


def ids_and_mask(*rows):
    ids = torch.tensor([[{"t": T, "i": I, "p": P}[c] for c in r] for r in rows])
    return ids, ids == I, (ids != P).long()


def test_bapa_single_image_hand_computed():
    ids, img, _ = ids_and_mask("tiiiitt")
    # s = 1 (first image token); image tokens share 1; text continues 2, 3
    assert bapa_position_ids(ids, img).tolist() == [[0, 1, 1, 1, 1, 2, 3]]


def test_bapa_image_at_index_zero():
    ids, img, _ = ids_and_mask("iiitt")
    assert bapa_position_ids(ids, img).tolist() == [[0, 0, 0, 1, 2]]


def test_bapa_left_padding_per_row():
    ids, img, mask = ids_and_mask("pptiitt", "tiiittt")
    pos = bapa_position_ids(ids, img, mask)
    assert pos.tolist() == [[1, 1, 0, 1, 1, 2, 3], [0, 1, 1, 1, 2, 3, 4]]


def test_bapa_two_images_collapse_separately():
    ids, img, _ = ids_and_mask("tiittiiit")
    assert bapa_position_ids(ids, img).tolist() == [[0, 1, 1, 2, 3, 4, 4, 4, 5]]


def test_bapa_touching_images_need_labels():
    ids = torch.full((1, 6), I)
    ids[0, 0] = T
    labels = torch.tensor([[0, 1, 1, 2, 2, 0]])
    ids[0, 5] = T
    assert bapa_position_ids(ids, labels).tolist() == [[0, 1, 1, 2, 2, 3]]


def test_bapa_no_image_is_ordinary_ids():
    ids, img, mask = ids_and_mask("tttt", "pttt")
    assert bapa_position_ids(ids, img, mask).tolist() == [[0, 1, 2, 3], [1, 0, 1, 2]]


def test_bapa_decode_position_continues_from_prompt():
    # method.md: the first generated token gets L − n_img + 1
    ids, img, _ = ids_and_mask("ttiiiiitt")
    L, n_img = ids.shape[1], 5
    assert bapa_position_ids(ids, img)[0, -1].item() + 1 == L - n_img + 1


def test_agci_hand_computation():
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # one image, 3 tokens
    g = torch.tensor([2 / 3, 2 / 3])
    lam = 0.5
    expected = []
    for t in v[0]:
        cos = float(t @ g) / (t.norm().item() * g.norm().item())
        expected.append((t + lam * (1 - cos) * g).tolist())
    out = agci_inject(v, lam)
    assert torch.allclose(out[0], torch.tensor(expected), atol=1e-6)
    # the token parallel to g is unchanged (w = 0)
    assert torch.allclose(out[0, 2], v[0, 2])


def test_agci_per_image_vs_pooled_and_flat():
    torch.manual_seed(0)
    v = torch.randn(2, 4, 8)
    per = agci_inject(v, 1.0)
    assert torch.allclose(per[0], agci_inject(v[:1], 1.0)[0])  # images are independent
    flat = agci_inject(v.reshape(8, 8), 1.0, tokens_per_image=4)
    assert torch.allclose(flat.reshape(2, 4, 8), per)
    assert torch.allclose(agci_inject(v.reshape(8, 8), 1.0, tokens_per_image=[4, 4]).reshape(2, 4, 8), per)
    pooled = agci_inject(v, 1.0, pooled=True)
    g = v.reshape(-1, 8).mean(0)
    w = 1 - torch.nn.functional.cosine_similarity(v, g.expand_as(v), dim=-1)
    assert torch.allclose(pooled, v + w[..., None] * g, atol=1e-6)
    assert not torch.allclose(pooled, per)


def test_agci_lambda_zero_is_identity():
    v = torch.randn(1, 5, 4)
    assert torch.equal(agci_inject(v, 0.0), v)


@pytest.mark.parametrize("lam", [-0.1, math.inf, math.nan, "1", True])
def test_agci_lambda_out_of_range(lam):
    with pytest.raises(SpatialBiasError, match="λ"):
        AGCI(lam=lam)
    with pytest.raises(SpatialBiasError, match="λ"):
        agci_inject(torch.zeros(1, 2, 2), lam)


def test_intervention_configs_round_trip():
    for iv in (BaPA(), AGCI(lam=0.25), AGCI(lam=1.0, pooled=True)):
        d = iv.to_dict()
        assert from_dict(d) == iv
    with pytest.raises(SpatialBiasError, match="unknown intervention"):
        from_dict({"kind": "nope"})
    with pytest.raises(SpatialBiasError, match="λ"):
        from_dict({"kind": "agci", "lam": -1})


def test_public_api_names():
    for name in ("load", "BaPA", "AGCI", "bapa_position_ids", "agci_inject"):
        assert hasattr(interp, name)


def test_every_intervention_kind_round_trips():
    from interp.interventions import Knockout
    from interp.interventions import PositionSwap
    for iv in (PositionSwap(a=1, b=7, layers=(0, 1)), Knockout(cells=(3,), layers=(1, 2), query="text"),
               BaPA(variant="keep_hw")):
        d = iv.to_dict()
        back = from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        assert back == iv


def test_new_controls_validate_their_arguments():
    with pytest.raises(SpatialBiasError, match="position control 'sideways'"):
        interp.PositionPermute("sideways")
    with pytest.raises(SpatialBiasError, match="rule 'median'"):
        interp.AdaptiveAGCI(rule="median")
    with pytest.raises(SpatialBiasError, match="out of range"):
        interp.AdaptiveAGCI(scale=-1.0)
    d = interp.AdaptiveAGCI(rule="norm_ratio", scale=0.25).to_dict()
    assert "lam" not in d and from_dict(d) == interp.AdaptiveAGCI(rule="norm_ratio", scale=0.25)
