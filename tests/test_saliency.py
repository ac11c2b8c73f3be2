from __future__ import annotations

import pytest
import torch

from erasure.io import CorruptFileError
from erasure.saliency import (
    accumulate_gradients,
    compute_mask,
    load_mask,
    mask_stats,
    pack_bits,
    save_mask,
    threshold_mask,
    unpack_bits,
)


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.rand(37, 11, generator=g),
        "b.bias": torch.rand(101, generator=g) * 3,
        "c.zero": torch.zeros(64),  # a block of exact ties at 0
        "d.dup": torch.full((50,), 0.5),  # a block of ties in the middle
    }


@pytest.mark.parametrize("ratio", [1e-3, 0.1, 0.25, 0.5, 0.77, 0.9, 0.99, 1.0])
def test_kept_count_is_exact(ratio):
    s = _scores()
    total = sum(v.numel() for v in s.values())
    m = threshold_mask(s, ratio)
    assert sum(int(v.sum()) for v in m.values()) == max(1, round(ratio * total))
    assert all(m[k].shape == s[k].shape and m[k].dtype == torch.bool for k in s)


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.8])
def test_matches_sort_reference(ratio):
    s = _scores(1)
    flat = torch.cat([v.reshape(-1) for v in s.values()])
    k = round(ratio * flat.numel())
    kth = flat.sort(descending=True).values[k - 1]
    m = threshold_mask(s, ratio)
    for name, v in s.items():
        assert bool((v[m[name]] >= kth).all()), "a kept weight is below the k-th largest score"
        assert bool(m[name][v > kth].all()), "a weight above the threshold was dropped"


def test_deterministic_and_tie_order():
    s = _scores()
    a, b = threshold_mask(s, 0.6), threshold_mask(s, 0.6)
    assert all(torch.equal(a[k], b[k]) for k in s)
    # ties at the threshold are taken in (parameter order, flat index) order
    m = threshold_mask({"x": torch.ones(10)}, 0.3)
    assert m["x"].tolist() == [True] * 3 + [False] * 7


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="mask ratio"):
        threshold_mask(_scores(), ratio)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_nonfinite_or_negative_scores_rejected(bad):
    with pytest.raises(ValueError, match="negative, infinite or NaN"):
        threshold_mask({"a": torch.tensor([1.0, 2.0, bad, 0.5])}, 0.5)


def test_accumulate_is_abs_of_sum():
    lin = torch.nn.Linear(3, 1, bias=False)
    params = dict(lin.named_parameters())
    x1, x2 = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[-2.0, 1.0, -1.0]])
    scores = accumulate_gradients(params, [x1, x2], lambda x: lin(x).sum())
    assert torch.allclose(scores["weight"], (x1 + x2).abs())
    s2 = accumulate_gradients(params, [x1, x2], lambda x: lin(x).sum(), mode="sum_of_abs")
    assert torch.allclose(s2["weight"], x1.abs() + x2.abs())
    assert lin.weight.grad is None
    with pytest.raises(ValueError, match="empty"):
        accumulate_gradients(params, [], lambda x: lin(x).sum())


def test_compute_mask_picks_the_params_the_loss_depends_on():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    # the loss only reads the output of the first layer: the second gets zero gradient
    params = dict(net.named_parameters())
    m = compute_mask(params, [torch.randn(8, 4)], lambda x: net[0](x).pow(2).sum(), ratio=0.4)
    assert int(m["1.weight"].sum()) == 0 and int(m["1.bias"].sum()) == 0
    assert mask_stats(m)["kept"] == round(0.4 * 40)


def test_pack_roundtrip_and_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = {"w": torch.rand(5, 7, 3, generator=g) > 0.5, "b": torch.rand(13, generator=g) > 0.2, "s": torch.tensor(True)}
    for v in m.values():
        assert torch.equal(unpack_bits(pack_bits(v), list(v.shape)), v)
    path = tmp_path / "mask.safetensors"
    save_mask(m, path, metadata={"note": "x"})
    back = load_mask(path)
    assert set(back) == set(m) and all(torch.equal(back[k], m[k]) and back[k].dtype == torch.bool for k in m)
    # packed: about one bit per weight
    assert path.stat().st_size < 1000


def test_corrupt_mask_file(tmp_path):
    m = {"w": torch.ones(1000, dtype=torch.bool)}
    path = tmp_path / "mask.safetensors"
    save_mask(m, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="safetensors"):
        load_mask(path)
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.safetensors")


def _plain_grad_sum(params, batches, loss_fn, mode):
    for p in params.values():
        p.grad = None
    acc = {}
    for b in batches:
        loss_fn(b).backward()
        for n, p in params.items():
            if mode == "sum_of_abs":
                acc[n] = acc[n] + p.grad.abs() if n in acc else p.grad.abs()
                p.grad = None
    if mode == "abs_of_sum":
        acc = {n: p.grad.abs() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return acc


@pytest.mark.parametrize("mode", ["abs_of_sum", "sum_of_abs"])
def test_hooked_float32_scores_equal_plain_gradient_sum_and_free_gradients(mode):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    params = dict(net.named_parameters())
    xs = [torch.randn(5, 6) for _ in range(4)]
    live = []

    def loss(x):
        live.append(sum(p.grad is not None for p in params.values()))  # no gradient survives a batch
        return net(x).pow(2).sum() - net(x).sum()

    ref = _plain_grad_sum(params, xs, lambda x: net(x).pow(2).sum() - net(x).sum(), mode)
    got = accumulate_gradients(params, xs, loss, mode=mode, score_dtype="float32")
    assert all(torch.equal(got[n], ref[n]) for n in params), "float32 hook scores must be bit-identical"
    assert live == [0, 0, 0, 0] and all(p.grad is None for p in params.values())
    assert not any(p._post_accumulate_grad_hooks for p in params.values()), "hooks must be removed"


def test_16bit_scores_close_and_dtype_setting():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 32)
    params = dict(lin.named_parameters())
    xs = [torch.randn(4, 32) for _ in range(3)]
    ref = accumulate_gradients(params, xs, lambda x: lin(x).pow(2).sum())
    for dt, tol in (("bfloat16", 1e-2), ("float16", 2e-3)):
        s = accumulate_gradients(params, xs, lambda x: lin(x).pow(2).sum(), score_dtype=dt)
        assert all(v.dtype == getattr(torch, dt) for v in s.values())
        for n in params:
            # one rounding per batch: errors scale with the partial sums, not with the (possibly cancelled) total
            torch.testing.assert_close(s[n].float(), ref[n], rtol=tol, atol=3 * tol * float(ref[n].max()))
        m, mref = threshold_mask(s, 0.3), threshold_mask(ref, 0.3)
        assert sum(int(v.sum()) for v in m.values()) == sum(int(v.sum()) for v in mref.values())
    with pytest.raises(ValueError, match="score dtype"):
        accumulate_gradients(params, xs, lambda x: lin(x).sum(), score_dtype="int8")


def test_auto_score_dtype():
    from erasure.saliency import score_dtype_for

    assert score_dtype_for("auto", 859_520_964) == torch.float32  # SD v1.4 UNet: exact as before
    assert score_dtype_for("auto", 2_567_463_684) == torch.bfloat16  # SDXL UNet
    assert score_dtype_for(torch.float16, 1) == torch.float16


@pytest.mark.parametrize("ratio", [0.3, 0.6, 1.0])
def test_threshold_consume_frees_scores_and_gives_the_same_mask(ratio):
    s = _scores(2)
    ref = threshold_mask(s, ratio)
    work = dict(s)
    got = threshold_mask(work, ratio, consume=True)
    assert work == {} and set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
