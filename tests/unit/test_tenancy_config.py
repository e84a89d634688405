"""The tenants file, quotas and per-request tenancy (issue 15), without a server."""

from __future__ import annotations

import pytest

from fleetlm.tenancy.admission import (
    PriorityOutOfRange,
    RequestContext,
    combined_salt,
    resolve,
    tenancy_for,
)
from fleetlm.tenancy.config import TenantsFileError, key_digest, parse_tenants
from fleetlm.tenancy.quota import QuotaExceeded, TenantState, TokenBucket
from fleetlm.tenancy.registry import TenantRegistry

GOOD = """\
[tenants.acme]
api_keys = ["sk-acme-1", "sk-acme-2"]
weight = 3
priority_range = [-2, 5]
requests_per_minute = 20
tokens_per_minute = 1000
max_concurrent_requests = 2
shared_prefixes = ["pub"]

[tenants.beta]
api_keys = ["sk-beta"]

[shared_prefixes.pub]
text = "You are a helpful assistant."
"""


def test_good_file_maps_keys_to_tenants_and_keeps_no_key():
    cfg = parse_tenants(GOOD, "t.toml", default_keys=("sk-admin",))
    assert set(cfg.tenants) == {"acme", "beta", "default"}
    acme = cfg.tenants["acme"]
    assert acme.weight == 3 and acme.priority_range == (-2, 5) and acme.default_priority == 0
    assert acme.limits.requests_per_minute == 20 and acme.limits.max_concurrent_requests == 2
    assert key_digest("sk-acme-2") in acme.key_digests
    assert "sk-acme" not in repr(cfg) and acme.salt not in repr(cfg)
    assert acme.salt != cfg.tenants["beta"].salt


@pytest.mark.parametrize("bad,line,what", [
    (GOOD.replace("weight = 3", "weight = 0"), 3, "weight must be a number > 0"),
    (GOOD.replace("weight = 3", "weigth = 3"), 3, "unknown field 'weigth'"),
    (GOOD.replace('api_keys = ["sk-beta"]', 'api_keys = ["sk-acme-2"]'), 11, "listed more than once"),
    (GOOD.replace("requests_per_minute = 20", "requests_per_minute = -1"), 5, "positive number"),
    (GOOD.replace("max_concurrent_requests = 2", "max_concurrent_requests = 1.5"), 7, "positive integer"),
    (GOOD.replace("tokens_per_minute = 1000", 'tokens_per_minute = "lots"'), 6, "positive number"),
    (GOOD.replace("priority_range = [-2, 5]", "priority_range = [5, -2]"), 4, "priority_range"),
    (GOOD.replace('shared_prefixes = ["pub"]', 'shared_prefixes = ["nope"]'), 8, "'nope' is not defined"),
    (GOOD + "\n[limits]\nx = 1\n", 16, "unknown field 'limits'"),
    (GOOD.replace("[tenants.beta]", "[tenants.none]"), 10, "reserved"),
])
def test_bad_file_errors_name_the_line_and_never_the_key(bad, line, what):
    with pytest.raises(TenantsFileError) as e:
        parse_tenants(bad, "t.toml")
    msg = str(e.value)
    assert msg.startswith(f"t.toml:{line}: "), msg
    assert what in msg
    assert "sk-" not in msg


def test_operator_key_listed_for_a_tenant_is_refused():
    with pytest.raises(TenantsFileError, match="also given with --api-key") as e:
        parse_tenants(GOOD, "t.toml", default_keys=("sk-beta",))
    assert "sk-beta" not in str(e.value)


def test_not_toml_is_an_error():
    with pytest.raises(TenantsFileError, match="not valid TOML"):
        parse_tenants("[tenants.a\n", "t.toml")


def test_reload_keeps_the_old_table_on_error(tmp_path, caplog):
    f = tmp_path / "t.toml"
    f.write_text(GOOD)
    reg = TenantRegistry(f)
    assert reg.authenticate(b"sk-beta") == "beta" and reg.authenticate(b"sk-nope") is None
    f.write_text(GOOD.replace("weight = 3", "weight = -1"))
    assert not reg.reload()
    assert reg.authenticate(b"sk-beta") == "beta" and reg.tenant("acme").weight == 3
    assert "t.toml:3" in caplog.text and "sk-" not in caplog.text
    f.write_text(GOOD.replace('api_keys = ["sk-beta"]', 'api_keys = ["sk-beta-2"]').replace("weight = 3", "weight = 1"))
    state = reg.state("acme")
    assert reg.reload()
    assert reg.authenticate(b"sk-beta") is None and reg.authenticate(b"sk-beta-2") == "beta"
    assert reg.tenant("acme").weight == 1 and reg.state("acme") is state  # counters survive a reload


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_refuses_the_next_with_a_correct_retry_after():
    from fleetlm.tenancy.config import Limits

    clock = Clock()
    st = TenantState("acme", Limits(requests_per_minute=20), clock)
    usages = [st.admit(5, {f"r{i}": 1}) for i in range(20)]
    with pytest.raises(QuotaExceeded) as e:
        st.admit(5, {"r20": 1})
    assert e.value.limit == "requests_per_minute" and e.value.retry_after == 3  # 60 s / 20
    assert "requests_per_minute" in str(e.value) and "retry after 3 s" in str(e.value)
    clock.t += 2.9
    with pytest.raises(QuotaExceeded) as e:
        st.admit(5, {"r20": 1})
    assert e.value.retry_after == 1
    clock.t += 0.1
    st.admit(5, {"r20": 1})
    for u in usages:
        st.release(u)


def test_tokens_per_minute_counts_output_and_prompt():
    from fleetlm.tenancy.config import Limits

    clock = Clock()
    st = TenantState("t", Limits(tokens_per_minute=100), clock)
    u = st.admit(10, {"a": 1})
    st.spend_output(60)  # streamed output
    with pytest.raises(QuotaExceeded) as e:
        st.admit(40, {"b": 1})
    assert e.value.limit == "tokens_per_minute" and e.value.retry_after == 6  # 10 short at 100/min
    st.release(u)
    with pytest.raises(ValueError, match="can never be admitted"):
        st.admit(101, {"c": 1})


def test_concurrency_and_queue_bounds_release_on_close():
    from fleetlm.tenancy.config import Limits

    st = TenantState("t", Limits(max_concurrent_requests=1, max_queued_requests=2))
    started = set()
    st.started = started.__contains__
    u = st.admit(1, {"a": 2})
    with pytest.raises(QuotaExceeded, match="max_concurrent_requests"):
        st.admit(1, {"b": 1})
    st.release(u)
    u1 = st.admit(1, {"b": 2})
    st.limits = Limits(max_queued_requests=2)  # lift the concurrency bound only
    with pytest.raises(QuotaExceeded, match="max_queued_requests"):
        st.admit(1, {"c": 1})
    started.add("b")
    st.admit(1, {"c": 1})
    st.release(u1)
    assert st.concurrent == 1


def test_bucket_reload_keeps_what_was_spent():
    clock = Clock()
    b = TokenBucket(60, clock)
    b.take(50)
    b.set_rate(30)
    assert b.level == pytest.approx(10)


def test_priority_range_and_tenancy(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(GOOD)
    reg = TenantRegistry(f, encode=lambda text, special: [1, 2, 3, 4, 5, 6, 7, 8] if special else [2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(PriorityOutOfRange, match=r"\[-2, 5\]"):
        resolve(reg, "acme", 6, None)
    ctx = resolve(reg, "acme", -2, "mine")
    t = tenancy_for(ctx, [1, 2, 3, 4, 5, 6, 9, 9, 9])
    assert (t.tenant_id, t.weight, t.priority) == ("acme", 3, -2)
    assert t.shared_prefix_tokens == 6 and t.shared_salt is not None
    assert t.cache_salt == combined_salt(reg.tenant("acme").salt, "mine") != combined_salt(reg.tenant("acme").salt, None)
    beta = tenancy_for(resolve(reg, "beta", None, "mine"), [1, 2, 3])
    assert beta.shared_prefix_tokens == 0 and beta.cache_salt != t.cache_salt  # same cache_salt, other tenant
    assert tenancy_for(RequestContext(), [1]).cache_salt is None
    assert tenancy_for(RequestContext(cache_salt="x"), [1]).cache_salt == combined_salt(None, "x")


def test_router_hook_predicts_the_engines_salted_hashes(tmp_path):
    from fleetlm.config import CacheConfig, SchedulerConfig
    from fleetlm.core.scheduler import Scheduler
    from fleetlm.request import Request
    from fleetlm.sampling_params import SamplingParams
    from fleetlm.tenancy.router_hook import salted_block_hashes, tenant_of_headers

    f = tmp_path / "t.toml"
    f.write_text(GOOD)
    reg = TenantRegistry(f, encode=lambda text, special: list(range(1, 9)))
    assert tenant_of_headers(reg)({"authorization": "Bearer sk-acme-1"}, None) == "acme"
    assert tenant_of_headers(reg)({"authorization": "Bearer nope"}, None) is None
    ids = list(range(1, 40))
    s = Scheduler(SchedulerConfig(256, 4, 256), CacheConfig(4, 64, True))
    r = Request("r", ids, SamplingParams(max_tokens=1), tenancy=tenancy_for(resolve(reg, "acme", None, "x"), ids))
    s.add_request(r)
    s.schedule()
    assert r.block_hashes == salted_block_hashes(reg, "acme", ids, 4, "x")
    beta = salted_block_hashes(reg, "beta", ids, 4)  # beta did not opt in to the shared prefix
    assert all(a != b for a, b in zip(r.block_hashes, beta, strict=False))
