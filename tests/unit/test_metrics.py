"""Root-free tests of checkpointd/metrics.py: the text exposition format 0.0.4 line by line,
cumulative histogram buckets, label escaping, thread safety, and the agent's metrics."""

import math
import re
import threading

import pytest

from checkpointd.metrics import (COMMIT_BUCKETS, REFUSAL_REASONS, ROLES, AgentMetrics, Counter,
                                 Histogram, Registry, escape_label, format_value, refusal_reason)

# one sample line of format 0.0.4: name, optional {labels}, a value
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
                    r'(NaN|[+-]Inf|-?[0-9.e+-]+)$')


def samples(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value.replace("Inf", "inf"))
    return out


def test_counter_and_gauge_exposition_line_by_line():
    r = Registry()
    c = r.counter("app_requests_total", "Requests served.")
    g = r.gauge("app_temperature", "Degrees.", ("room",))
    c.inc()
    c.inc(2)
    g.set(21.5, room="kitchen")
    g.set(-3, room="attic")
    assert r.render().splitlines() == [
        "# HELP app_requests_total Requests served.",
        "# TYPE app_requests_total counter",
        "app_requests_total 3",
        "# HELP app_temperature Degrees.",
        "# TYPE app_temperature gauge",
        'app_temperature{room="attic"} -3',
        'app_temperature{room="kitchen"} 21.5',
    ]
    assert r.render().endswith("\n")


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    r = Registry()
    h = r.histogram("lat_seconds", "Latency.", buckets=(0.1, 1, 2.5))
    for v in (0.05, 0.1, 0.5, 0.7, 2.5, 3.0, math.inf):
        h.observe(v)
    lines = r.render().splitlines()
    assert lines[:2] == ["# HELP lat_seconds Latency.", "# TYPE lat_seconds histogram"]
    assert lines[2:6] == [
        'lat_seconds_bucket{le="0.1"} 2',     # 0.05 and 0.1 (le is inclusive)
        'lat_seconds_bucket{le="1"} 4',
        'lat_seconds_bucket{le="2.5"} 5',
        'lat_seconds_bucket{le="+Inf"} 7',
    ]
    assert lines[6] == "lat_seconds_sum +Inf"
    assert lines[7] == "lat_seconds_count 7"
    assert len(lines) == 8


def test_histogram_sum_and_empty_histogram():
    h = Histogram("x_seconds", "x", buckets=(1,))
    assert [s[3] for s in h.samples()] == [0, 0, 0, 0]
    h.observe(0.25)
    h.observe(0.5)
    cumulative, total, n = h.snapshot()
    assert cumulative == [2, 2] and total == 0.75 and n == 2


def test_commit_buckets_span_half_a_millisecond_to_two_and_a_half_seconds():
    assert COMMIT_BUCKETS[0] == 0.0005 and COMMIT_BUCKETS[-1] == 2.5
    assert list(COMMIT_BUCKETS) == sorted(set(COMMIT_BUCKETS))
    assert 0.05 in COMMIT_BUCKETS   # the p99 > 50 ms alert's threshold is a bound


@pytest.mark.parametrize("buckets", [(), (1, 1), (2, 1), (float("nan"),)])
def test_bad_buckets_refused(buckets):
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=buckets)


def test_nan_observation_refused():
    with pytest.raises(ValueError):
        Histogram("h", "h").observe(math.nan)


def test_label_values_and_help_are_escaped():
    r = Registry()
    g = r.gauge("g", 'Help with \\ backslash\nand "quotes".', ("path",))
    g.set(1, path='C:\\dir "x"\nnext')
    lines = r.render().splitlines()
    assert lines[0] == '# HELP g Help with \\\\ backslash\\nand "quotes".'
    assert lines[2] == 'g{path="C:\\\\dir \\"x\\"\\nnext"} 1'
    assert SAMPLE.match(lines[2])
    assert escape_label('a"b') == 'a\\"b'


@pytest.mark.parametrize("value,text", [
    (0, "0"), (3.0, "3"), (0.0005, "0.0005"), (2.5, "2.5"), (-1, "-1"), (1e20, "1e+20"),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN")])
def test_value_formatting(value, text):
    assert format_value(value) == text


def test_counter_rules():
    c = Counter("c_total", "c", ("reason",))
    with pytest.raises(ValueError):
        c.inc(-1, reason="x")
    with pytest.raises(ValueError):
        c.inc(reason_typo="x")          # a typo must not create a new series
    with pytest.raises(ValueError):
        c.inc()
    c.raise_to(5, reason="x")
    c.raise_to(3, reason="x")          # never down
    assert c.value(reason="x") == 5


@pytest.mark.parametrize("name,labels", [("1bad", ()), ("ok", ("le-x",)), ("ok", ("__x",)),
                                         ("ok", ("a", "a"))])
def test_bad_names_refused(name, labels):
    with pytest.raises(ValueError):
        Counter(name, "h", labels)


def test_registering_a_name_twice_is_refused():
    r = Registry()
    r.counter("x_total", "x")
    with pytest.raises(ValueError):
        r.gauge("x_total", "x")


def test_declared_label_sets_are_exposed_at_zero():
    c = Counter("c_total", "c", ("reason",))
    c.declare(reason="epoch")
    assert [(s[2], s[3]) for s in c.samples()] == [(("epoch",), 0.0)]


def test_set_only_leaves_exactly_one_label_at_one():
    r = Registry()
    g = r.gauge("role", "r", ("role",))
    for role in ("a", "b", "c"):
        g.declare(role=role)
    g.set_only(role="b")
    g.set_only(role="c")
    assert samples(r.render()) == {'role{role="a"}': 0, 'role{role="b"}': 0, 'role{role="c"}': 1}


def test_thread_safety_no_increment_lost():
    r = Registry()
    c = r.counter("n_total", "n", ("t",))
    h = r.histogram("h_seconds", "h", buckets=(0.5,))
    threads, per = 8, 5000
    start = threading.Barrier(threads + 1)
    done = threading.Event()
    renders = []

    def work(i):
        start.wait()
        for k in range(per):
            c.inc(t=str(i % 2))
            h.observe(0.25 if k % 2 else 0.75)

    def scrape():
        start.wait()
        while not done.is_set():
            renders.append(r.render())

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    scraper = threading.Thread(target=scrape)
    for t in workers + [scraper]:
        t.start()
    for t in workers:
        t.join()
    done.set()
    scraper.join()
    final = samples(r.render())
    assert final['n_total{t="0"}'] + final['n_total{t="1"}'] == threads * per
    assert final['h_seconds_bucket{le="0.5"}'] == threads * per / 2
    assert final['h_seconds_count'] == final['h_seconds_bucket{le="+Inf"}'] == threads * per
    # every scrape taken during the run is self-consistent: +Inf bucket == count
    for text in renders:
        s = samples(text)
        assert s['h_seconds_bucket{le="+Inf"}'] == s["h_seconds_count"]
        assert s['h_seconds_bucket{le="0.5"}'] <= s["h_seconds_count"]


# -- the agent's metrics --------------------------------------------------------------------

def test_agent_metrics_names_types_and_every_line_parses():
    text = AgentMetrics().render()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == {
        "tcpcp_checkpoints_total": "counter",
        "tcpcp_commit_batches_total": "counter",
        "tcpcp_commit_latency_seconds": "histogram",
        "tcpcp_records_refused_total": "counter",
        "tcpcp_gate_commits_total": "counter",
        "tcpcp_gate_full_total": "counter",
        "tcpcp_resurrections_total": "counter",
        "tcpcp_resurrection_failures_total": "counter",
        "tcpcp_passed_total": "counter",
        "tcpcp_fences_total": "counter",
        "tcpcp_role_changes_total": "counter",
        "tcpcp_role": "gauge",
        "tcpcp_connections_protected": "gauge",
        "tcpcp_connections_unprotected": "gauge",
        "tcpcp_last_checkpoint_age_max_seconds": "gauge",
        "tcpcp_etcd_errors_total": "counter",
    }
    help_names = re.findall(r"^# HELP (\S+) \S", text, re.M)
    assert help_names == list(types)
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    s = samples(text)
    for reason in REFUSAL_REASONS:
        assert s[f'tcpcp_records_refused_total{{reason="{reason}"}}'] == 0
    for role in ROLES:
        assert s[f'tcpcp_role{{role="{role}"}}'] == 0


def test_observe_commit_and_counters():
    m = AgentMetrics()
    m.observe_commit(0.003)
    m.observe_commit(0.2)
    m.observe_commit(-0.001)            # a clock oddity counts as 0, never raises
    m.checkpoints_written(40, batches=1)
    m.record_refused("stale")
    m.record_refused("format", 2)
    m.record_refused("something new")
    m.resurrection_failed("probe")
    m.gate_full.inc()
    m.etcd_errors.inc()
    s = samples(m.render())
    assert s['tcpcp_commit_latency_seconds_bucket{le="0.0005"}'] == 1
    assert s['tcpcp_commit_latency_seconds_bucket{le="0.005"}'] == 2
    assert s['tcpcp_commit_latency_seconds_bucket{le="0.25"}'] == 3
    assert s["tcpcp_commit_latency_seconds_count"] == 3
    assert s["tcpcp_commit_latency_seconds_sum"] == pytest.approx(0.203)
    assert s["tcpcp_checkpoints_total"] == 40 and s["tcpcp_commit_batches_total"] == 1
    assert s['tcpcp_records_refused_total{reason="msl"}'] == 1
    assert s['tcpcp_records_refused_total{reason="decode"}'] == 2
    assert s['tcpcp_records_refused_total{reason="other"}'] == 1
    assert s['tcpcp_resurrection_failures_total{reason="probe"}'] == 1
    assert s["tcpcp_gate_full_total"] == 1 and s["tcpcp_etcd_errors_total"] == 1


@pytest.mark.parametrize("reason,label", [("authentication", "authentication"), ("epoch", "epoch"),
                                          ("stale", "msl"), ("size", "bytes"), ("version", "decode"),
                                          ("bound", "other")])
def test_refusal_reasons_map_onto_a_fixed_set(reason, label):
    assert refusal_reason(reason) == label


def status(**over):
    st = {"host": "a", "role": "primary", "epoch": 3, "holder": "a", "connections": 2,
          "fenced": False, "counters": {"checkpoints": 10, "commit_batches": 4, "refused": 1,
                                        "resurrected": 2, "fenced": 0},
          "last_resurrection": None, "events": [], "clock": 100.0, "wall_ns": 0}
    st.update(over)
    return st


def test_update_from_status_sets_role_and_raises_counters():
    m = AgentMetrics()
    m.update_from_status(status())
    s = samples(m.render())
    assert s['tcpcp_role{role="primary"}'] == 1
    assert sum(s[f'tcpcp_role{{role="{r}"}}'] for r in ROLES) == 1
    assert s["tcpcp_checkpoints_total"] == 10 and s["tcpcp_commit_batches_total"] == 4
    assert s["tcpcp_resurrections_total"] == 2 and s["tcpcp_fences_total"] == 0
    assert s["tcpcp_role_changes_total"] == 0
    # the agent bumped its own metric too: the status total is not added a second time
    m.checkpoints_written(10, batches=4)
    m.update_from_status(status(role="primary", fenced=True,
                                counters={"checkpoints": 20, "fenced": 1}))
    s = samples(m.render())
    assert s["tcpcp_checkpoints_total"] == 20
    assert s['tcpcp_role{role="fenced"}'] == 1 and s['tcpcp_role{role="primary"}'] == 0
    assert s["tcpcp_fences_total"] == 1 and s["tcpcp_role_changes_total"] == 1


def test_update_from_status_optional_gauges():
    m = AgentMetrics()
    m.update_from_status(status(connections_protected=5, connections_unprotected=1,
                                last_checkpoint_age_max=7.5))
    s = samples(m.render())
    assert s["tcpcp_connections_protected"] == 5 and s["tcpcp_connections_unprotected"] == 1
    assert s["tcpcp_last_checkpoint_age_max_seconds"] == 7.5
    m.update_from_status({"role": "standby"})        # missing keys leave the gauges alone
    s = samples(m.render())
    assert s["tcpcp_connections_protected"] == 5
    assert s['tcpcp_role{role="standby"}'] == 1


def test_passed_counters_follow_the_agents_totals_by_direction():
    m = AgentMetrics()
    m.update_from_status({"counters": {"passed_out": 3, "passed_in": 0}})
    m.update_from_status({"counters": {"passed_out": 2, "passed_in": 5}})   # never down
    text = m.render()
    assert 'tcpcp_passed_total{direction="out"} 3' in text
    assert 'tcpcp_passed_total{direction="in"} 5' in text
