import pytest
import torch

from hf_memkit.errors import IncompatibleModelError, RecipeError
from hf_memkit.prune import sparse24
from hf_memkit.prune.masks import check_nm, is_nm, magnitude_scores, nm_counts, nm_mask, wanda_scores


def test_mask_keeps_exactly_two_of_four_with_ties_and_zeros():
    w = torch.randn(16, 32)
    w[0] = 0.0  # all ties
    w[1, :4] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    m = nm_mask(magnitude_scores(w))
    assert (nm_counts(m) == 2).all()
    assert m[0, :4].tolist() == [True, True, False, False]  # ties: lower index wins
    assert m[1, :4].tolist() == [True, True, False, False]
    assert torch.equal(m, nm_mask(magnitude_scores(w.clone())))  # deterministic


def test_mask_picks_largest_and_wanda_uses_activations():
    w = torch.tensor([[0.1, 0.5, -0.9, 0.2]])
    assert nm_mask(w.abs()).tolist() == [[False, True, True, False]]
    norms = torch.tensor([100.0, 0.0, 0.0, 100.0]) ** 2
    assert nm_mask(wanda_scores(w, norms)).tolist() == [[True, False, False, True]]


def test_bad_patterns_are_typed_errors():
    with pytest.raises(RecipeError):
        check_nm(4, 8)
    with pytest.raises(IncompatibleModelError):
        nm_mask(torch.randn(4, 6))  # width not a multiple of 4
    with pytest.raises(IncompatibleModelError):
        nm_mask(torch.randn(4, 8), 4, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compress_decompress_bit_exact(dtype):
    w = torch.randn(24, 40).to(dtype)
    mask = nm_mask(w.abs())
    w = w * mask.to(dtype)
    w[3, :4] = 0  # kept weights that are exactly zero survive through the stored mask
    t = sparse24.compress(w, mask)
    assert t["compressed"].shape == (24, 20) and t["bitmask"].shape == (24, 5) and t["bitmask"].dtype == torch.uint8
    back = sparse24.decompress(t)
    assert back.dtype == dtype and torch.equal(back, w)
    assert torch.equal(sparse24.unpack_bitmask(t["bitmask"], 40), mask)
    assert is_nm(back, exact=False)


def test_bitmask_is_numpy_packbits_little():
    np = pytest.importorskip("numpy")
    mask = torch.rand(5, 24) > 0.5
    want = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert (sparse24.pack_bitmask(mask).numpy() == want).all()


def test_compress_refuses_dense_weight():
    with pytest.raises(IncompatibleModelError):
        sparse24.compress(torch.randn(4, 8))
