import pickle
import threading

import pytest
import torch

from dfml_bench.access import APIInfo, BudgetExhausted, InProcessAPI, QueryError, QueryMeter, TopK


def _api(kind="logits", total=None, per_api=None, n=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    meter = QueryMeter(n, total_budget=total, per_api_budget=per_api)
    apis = [InProcessAPI(model, APIInfo(index=i, num_classes=5, classes=tuple(range(5)), input_shape=(3, 4, 4),
                                        output_kind=kind, topk=2, max_batch=100), meter) for i in range(n)]
    return apis, meter


def test_every_image_is_counted():
    (a, b), meter = _api()
    a.query(torch.rand(7, 3, 4, 4)); b.query(torch.rand(3, 3, 4, 4)); a.query(torch.rand(1, 3, 4, 4))
    assert meter.used == [8, 3] and meter.total_used == 11


def test_budget_exhausted_refuses_whole_query_with_exact_counts():
    (a, b), meter = _api(total=10, per_api=8)
    a.query(torch.rand(6, 3, 4, 4))
    with pytest.raises(BudgetExhausted) as e:
        a.query(torch.rand(3, 3, 4, 4))  # 6 + 3 > per-API 8
    assert (e.value.requested, e.value.used, e.value.budget, e.value.scope) == (3, 6, 8, "api:0")
    b.query(torch.rand(4, 3, 4, 4))
    with pytest.raises(BudgetExhausted, match="total budget of 10"):
        b.query(torch.rand(1, 3, 4, 4))
    assert meter.used == [6, 4]  # refused queries were not charged
    assert a.remaining_budget == 0


def test_counts_exact_under_concurrency():
    (a, b), meter = _api()

    def worker(api):
        for _ in range(50):
            api.query(torch.rand(3, 3, 4, 4))

    threads = [threading.Thread(target=worker, args=(api,)) for api in (a, b, a, b)]
    [t.start() for t in threads]; [t.join() for t in threads]
    assert meter.used == [300, 300]


@pytest.mark.parametrize("bad,msg", [
    (torch.rand(2, 3, 5, 5), "shape"),
    (torch.rand(2, 3, 4, 4).double().long(), "dtype"),
    (torch.rand(2, 3, 4, 4) * 255, r"\[0.0, 1.0\]"),
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
    (torch.rand(0, 3, 4, 4), "empty"),
    (torch.rand(101, 3, 4, 4), "maximum"),
    ([[0.5]], "torch.Tensor"),
])
def test_bad_queries_are_clear_and_not_charged(bad, msg):
    (a, _), meter = _api()
    with pytest.raises(QueryError, match=msg):
        a.query(bad)
    assert meter.total_used == 0


def test_output_kinds():
    x = torch.rand(4, 3, 4, 4)
    logits = _api("logits")[0][0].query(x)
    probs = _api("probs")[0][0].query(x)
    top = _api("topk")[0][0].query(x)
    label = _api("label")[0][0].query(x)
    assert torch.allclose(probs, logits.softmax(1))
    assert isinstance(top, TopK) and top.values.shape == (4, 2) and torch.equal(top.indices[:, 0], logits.argmax(1))
    assert torch.equal(label, logits.argmax(1)) and label.dtype == torch.long


def test_api_handle_cannot_be_pickled_and_has_no_model_attribute():
    (a, _), _ = _api()
    with pytest.raises(TypeError):
        pickle.dumps(a)
    assert not any(isinstance(getattr(a, n, None), torch.nn.Module) for n in dir(a))
