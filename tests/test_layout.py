"""AdapterLayout, TokenGroups and argument validation of the public ops."""

import math

import pytest
import torch

import hetlora_kernels as hk


def test_layout_fields():
    lay = hk.AdapterLayout([3, 1, 7])
    assert lay.ranks == (3, 1, 7)
    assert lay.offsets == (0, 3, 4, 11)
    assert (lay.num_adapters, lay.total_rank, lay.max_rank) == (3, 11, 7)
    assert lay.row_adapter().tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2]
    assert lay.row_component().tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6]
    assert lay.rows(2) == slice(4, 11)
    assert hk.AdapterLayout(torch.tensor([3, 1, 7])) == lay


def test_rank_classes_batch_the_adapters_of_each_rank():
    lay = hk.AdapterLayout([3, 1, 7, 3, 1])
    classes = lay.rank_classes()
    assert [(r, ks.tolist(), rows.tolist()) for r, ks, rows in classes] == [
        (1, [1, 4], [3, 14]),
        (3, [0, 3], [0, 1, 2, 11, 12, 13]),
        (7, [2], [4, 5, 6, 7, 8, 9, 10]),
    ]
    A = torch.randn(lay.total_rank, 5)
    for r, ks, rows in classes:
        batch = A[rows].view(len(ks), r, 5)
        for n, k in enumerate(ks.tolist()):
            assert torch.equal(batch[n], A[lay.rows(k)])
    assert lay.rank_classes() is classes  # cached
    meta = lay.rank_classes("meta")  # cached per device: never another device's tensors
    assert meta is not classes and all(t.device.type == "meta" for _, ks, rows in meta for t in (ks, rows))
    assert lay.rank_classes("cpu") is classes and lay.rank_classes("meta") is meta


def test_to_device_returns_the_same_tensor_on_its_own_device_and_copies_elsewhere():
    from hetlora_kernels.layout import to_device

    t = torch.arange(6)
    assert to_device(t, "cpu") is t and to_device(t, torch.device("cpu")) is t
    m = to_device(t, "meta")
    assert m.device.type == "meta" and m.shape == t.shape and m.dtype == t.dtype


@pytest.mark.parametrize(
    "ranks, exc",
    [
        ([], ValueError),
        ([2, 0], ValueError),
        ([-1], ValueError),
        ([1.5], TypeError),
        ([True], TypeError),
        ("3", TypeError),
    ],
)
def test_layout_rejects_bad_ranks(ranks, exc):
    with pytest.raises(exc, match="ranks"):
        hk.AdapterLayout(ranks)


def test_token_groups_unsorted_and_unrouted():
    ids = torch.tensor([2, -1, 0, 2, -1, 0, 0])
    g = hk.TokenGroups.from_adapter_ids(ids, 4)
    assert g.num_tokens == 7 and g.num_routed == 5
    assert g.counts_list == (3, 0, 2, 0)
    assert g.starts_list == (2, 5, 5, 7, 7)
    assert not g.is_sorted
    for k in range(4):
        members = g.order[g.starts_list[k] : g.starts_list[k + 1]]
        assert torch.all(ids[members] == k)
        assert torch.all(members[1:] > members[:-1])  # stable
    assert torch.all(ids[g.order[:2]] == -1)


def test_token_groups_from_lengths():
    g = hk.TokenGroups.from_lengths([2, 0, 3])
    assert g.adapter_ids.tolist() == [0, 0, 2, 2, 2]
    assert g.is_sorted and g.counts_list == (2, 0, 3)
    assert hk.TokenGroups.from_adapter_ids(torch.tensor([0, 0, 1]), 2).is_sorted
    with pytest.raises(ValueError, match="lengths"):
        hk.TokenGroups.from_lengths([1, -2])


@pytest.mark.parametrize("ids", [torch.tensor([0, 3]), torch.tensor([-2, 0])])
def test_token_groups_reject_out_of_range_ids(ids):
    with pytest.raises(ValueError, match="adapter_ids"):
        hk.TokenGroups.from_adapter_ids(ids, 3)


def test_token_groups_reject_bad_types():
    with pytest.raises(TypeError, match="adapter_ids"):
        hk.TokenGroups.from_adapter_ids(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="adapter_ids"):
        hk.TokenGroups.from_adapter_ids(torch.zeros(2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_adapters"):
        hk.TokenGroups.from_adapter_ids(torch.tensor([0]), 0)


def _setup():
    layout = hk.AdapterLayout([2, 3])
    x = torch.randn(4, 6)
    A, B = torch.randn(5, 6), torch.randn(5, 7)
    groups = hk.TokenGroups.from_adapter_ids(torch.tensor([0, 1, 1, -1]), 2)
    return x, A, B, layout, groups


@pytest.mark.parametrize(
    "mutate, exc, name",
    [
        (lambda a: a.update(x=torch.randn(4, 6, 1)), ValueError, "x"),
        (lambda a: a.update(x=torch.randn(5, 6)), ValueError, "x has T=5"),
        (lambda a: a.update(x=torch.randn(4, 5)), ValueError, "d_in"),
        (lambda a: a.update(A=torch.randn(4, 6)), ValueError, "A has 4 rows"),
        (lambda a: a.update(B=torch.randn(5, 7, dtype=torch.float64)), TypeError, "B dtype"),
        (lambda a: a.update(x=torch.randn(4, 6, dtype=torch.float16)), TypeError, "A dtype"),
        (lambda a: a.update(x=torch.ones(4, 6, dtype=torch.long)), TypeError, "x must be"),
        (lambda a: a.update(scaling=math.nan), ValueError, "scaling"),
        (lambda a: a.update(scaling=torch.tensor([1.0, math.inf])), ValueError, "scaling"),
        (lambda a: a.update(scaling=torch.ones(3)), ValueError, "scaling"),
        (lambda a: a.update(scaling="1"), TypeError, "scaling"),
        (lambda a: a.update(layout=[2, 3]), TypeError, "layout"),
        (lambda a: a.update(groups=torch.tensor([0, 1, 1, 0])), TypeError, "groups"),
        (
            lambda a: a.update(groups=hk.TokenGroups.from_adapter_ids(torch.tensor([0, 1, 1, 0]), 3)),
            ValueError,
            "groups",
        ),
    ],
)
def test_lora_delta_bad_input_names_argument(mutate, exc, name):
    x, A, B, layout, groups = _setup()
    args = dict(x=x, A=A, B=B, layout=layout, groups=groups, scaling=1.0)
    mutate(args)
    with pytest.raises(exc, match=name):
        hk.lora_delta(**args)


def test_lora_linear_bad_base():
    x, A, B, layout, groups = _setup()
    with pytest.raises(ValueError, match="weight"):
        hk.lora_linear(x, torch.randn(6, 7), None, A, B, layout, groups, 1.0)
    with pytest.raises(ValueError, match="bias"):
        hk.lora_linear(x, torch.randn(7, 6), torch.randn(6), A, B, layout, groups, 1.0)


def test_backend_switch():
    assert hk.get_backend() == "auto"
    with hk.use_backend("torch"):
        assert hk.get_backend() == "torch"
        x, A, B, layout, groups = _setup()
        hk.lora_delta(x, A, B, layout, groups, 1.0)
    assert hk.get_backend() == "auto"
    hk.set_backend("torch")
    assert hk.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend"):
        hk.set_backend("numpy")
    with pytest.raises(ValueError, match="backend"):
        with hk.use_backend("fast"):
            pass


def test_layout_copies_and_pickles():
    import copy
    import pickle

    lay = hk.AdapterLayout([3, 1, 7])
    lay.offsets_tensor("cpu")  # a filled cache travels or not, either is fine
    for other in (copy.copy(lay), copy.deepcopy(lay), pickle.loads(pickle.dumps(lay))):
        assert isinstance(other, hk.AdapterLayout)
        assert (other.ranks, other.offsets, other.total_rank, other.max_rank) == (lay.ranks, lay.offsets, 7 + 4, 7)
        with pytest.raises(AttributeError, match="immutable"):
            other.ranks = (1,)


def test_a_replaced_token_groups_is_validated_and_routed_afresh():
    """`dataclasses.replace` (the way to derive a frozen dataclass) carries no routing cache and no
    trust over: the new batch is checked and routed by its own ids."""
    import dataclasses

    g1 = hk.TokenGroups.from_adapter_ids(torch.tensor([1, 0, 1, -1]), 2)
    assert torch.equal(g1.routed_order(), torch.tensor([1, 0, 2]))  # now cached on g1
    # another batch of the same counts: ids [0, 1, 1, -1]
    g2 = dataclasses.replace(g1, adapter_ids=torch.tensor([0, 1, 1, -1]), order=torch.tensor([3, 0, 1, 2]))
    assert g2._cache is not g1._cache
    assert torch.equal(g2.routed_order(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="groups"):  # an inconsistent one is refused, as if built by hand
        dataclasses.replace(g1, adapter_ids=torch.tensor([0, 0, 0, 0]))


def test_server_ops_keep_their_gradient_or_refuse_a_backend_without_one():
    """delta_fro_norms, weighted_aggregate and truncate are differentiable on the torch path: under
    ``auto`` inputs that require grad go there (a detached result would lose the gradient without a
    word), and another chosen backend refuses them, naming the op."""
    lay = hk.AdapterLayout([2, 3])
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    calls = [(hk.delta_fro_norms, lambda a, b: hk.delta_fro_norms(a, b, lay, [0.5, 2.0])),
             (hk.weighted_aggregate, lambda a, b: hk.weighted_aggregate(a, b, lay, [0.3, 0.7])[1]),
             (hk.truncate, lambda a, b: hk.truncate(a[:3], b[:3], [1, 3])[0])]
    for op, fn in calls:
        assert torch.autograd.gradcheck(fn, (A, B)), op.__name__
        with hk.use_backend("cuda"), pytest.raises(ValueError, match=f"{op.__name__} is differentiable only"):
            fn(A, B)
        with hk.use_backend("cuda"):  # detached inputs run on the chosen backend
            fn(A.detach(), B.detach())
