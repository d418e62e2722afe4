"""Prometheus families of one node (``MeshCollector``), read from its ``NodeObserver`` at
scrape time. Imported by the HTTP application only (``runtime/http_app.py``), so a node
that is never scraped does not load prometheus_client."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

import meshscale
from meshscale.core.streams import split_source
from meshscale.runtime.observe import (
    MAX_METRIC_FUNCTIONS,
    MAX_METRIC_METHODS,
    NodeObserver,
    ObservedNode,
    ServiceCallMetrics,
)


class MeshCollector(Collector):
    """Prometheus families read from a node's live state at scrape time."""

    def __init__(self, observer: NodeObserver) -> None:
        self.obs = observer

    def collect(self) -> Iterator[Metric]:
        obs, agent = self.obs, self.obs.agent
        yield from self._membership(obs, agent)
        yield from self._transport(agent)
        yield from self._data(obs, agent)
        yield from self._compute(obs, agent)
        yield from self._streams(agent)
        yield from self._services(agent)
        g = GaugeMetricFamily("meshscale_power_watts", "Power draw over the last second "
                              "(watts), measured (source=rapl) or modelled (source=model).",
                              labels=["source"])
        g.add_metric([agent.power.source], agent.power.watts)
        yield g
        c = CounterMetricFamily("meshscale_energy_joules", "Energy used since start "
                                "(joules), measured or modelled as meshscale_power_watts.",
                                labels=["source"])
        c.add_metric([agent.power.source], agent.power.joules)
        yield c
        g = GaugeMetricFamily("meshscale_utilization_ratio", "Busy worker slots / slots.")
        g.add_metric([], obs.utilization())
        yield g
        g = GaugeMetricFamily("meshscale_cpu_utilization_ratio", "CPU used by the agent and "
                              "its workers over the last second / the machine's CPUs.")
        g.add_metric([], agent.power.utilisation)
        yield g

    @staticmethod
    def _membership(obs: NodeObserver, agent: ObservedNode) -> Iterator[Metric]:
        info = GaugeMetricFamily("meshscale_node_info", "This node.",
                                 labels=["node", "region", "zone", "version"])
        info.add_metric([agent.name, agent.meta.region, agent.meta.zone,
                         meshscale.__version__], 1)
        yield info
        g = GaugeMetricFamily("meshscale_members", "Members in this node's view, by state.",
                              labels=["state"])
        for state, n in obs.member_states().items():
            g.add_metric([state], n)
        yield g
        st = agent.m.stats
        for name, key, doc in (
            ("meshscale_probes", "probes", "Direct probes sent."),
            ("meshscale_indirect_probes", "indirect_probes", "Indirect probes requested."),
            ("meshscale_probe_failures", "probe_failures", "Probes that got no ack."),
            ("meshscale_suspicions", "suspicions", "Members this node started suspecting."),
            ("meshscale_refutations", "refutations", "Suspicions of this node it refuted."),
            ("meshscale_deaths", "deaths", "Members declared dead."),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(st.get(key, 0)))
            yield c
        g = GaugeMetricFamily("meshscale_health_score", "Lifeguard local health (0 = healthy).")
        g.add_metric([], agent.m.health_score())
        yield g

    @staticmethod
    def _transport(agent: ObservedNode) -> Iterator[Metric]:
        s = agent.stats
        for name, doc, counter in (
            ("meshscale_received_messages", "Messages received, by type (gossip kinds; for "
             "an RPC method, requests served and replies to this node's own calls).",
             s.messages_in),
            ("meshscale_sent_messages", "Messages sent, by type (gossip kinds; for an RPC "
             "method, this node's own calls and its replies to others').", s.messages_out),
            ("meshscale_received_bytes", "Bytes received, by message type (as "
             "received_messages).", s.bytes_in),
            ("meshscale_sent_bytes", "Bytes sent, by message type (as sent_messages).",
             s.bytes_out),
        ):
            c = CounterMetricFamily(name, doc, labels=["type"])
            for kind, n in sorted(counter.items()):
                c.add_metric([kind], n)
            yield c
        c = CounterMetricFamily("meshscale_rejected_messages", "Messages dropped, by reason.",
                                labels=["reason"])
        for reason, n in sorted(agent.rejected_messages().items()):
            c.add_metric([reason], n)
        yield c
        c = CounterMetricFamily("meshscale_rpc_refused", "RPCs refused because the caller's "
                                "role may not call the method.", labels=["method", "role"])
        for (method, role), n in sorted(agent.stats.refused.items()):
            c.add_metric([method, role], n)
        yield c

    @staticmethod
    def _data(obs: NodeObserver, agent: ObservedNode) -> Iterator[Metric]:
        objects, nbytes, under = obs.store_stats()
        space = obs.disk_space()
        if space is not None:
            free, reserve = space
            for name, value, doc in (
                ("meshscale_disk_free_bytes", free, "Free space on the data dir's file system."),
                ("meshscale_disk_reserve_bytes", reserve,
                 "Free space writes keep (below it, writes are refused)."),
                ("meshscale_disk_full", int(free < reserve),
                 "1 while free space is below the reserve: the node refuses writes, and "
                 "other nodes leave it out of new replica sets until it has room. Alarm."),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        for name, value, doc in (
            ("meshscale_stored_objects", objects, "Objects stored on this node."),
            ("meshscale_stored_bytes", nbytes, "Bytes of objects stored on this node."),
            ("meshscale_objects_under_replicated", under,
             "Objects held here with fewer allowed live nodes than their policy wants."),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        dp = agent.dataplane
        rm_stats = dp.rm.stats if dp is not None and dp.rm is not None else {}
        c = CounterMetricFamily("meshscale_repairs", "Re-replication transfers, by result.",
                                labels=["result"])
        for result, key in (("started", "repairs_started"), ("done", "repairs_done"),
                            ("failed", "repairs_failed"), ("shed", "repairs_shed")):
            c.add_metric([result], rm_stats.get(key, 0))
        yield c
        c = CounterMetricFamily("meshscale_read_served_bytes", "Bytes this node read from its "
                                "own copies for readers (clients, or nodes relaying to "
                                "them); a range read counts only its range.")
        c.add_metric([], dp.stats.get("read_served_bytes", 0) if dp is not None else 0)
        yield c

    @staticmethod
    def _streams(agent: ObservedNode) -> Iterator[Metric]:
        plane = agent.streams
        counters = plane.stats if plane is not None else {}
        for name, key, doc in (
            ("meshscale_stream_appended_records", "records_in", "Records appended to shards "
             "whose source is this node (producers and operator outputs)."),
            ("meshscale_stream_backed_up_records", "records_backed_up",
             "Records copied here as another node's shard backup."),
            ("meshscale_stream_publish_waits", "publish_waits",
             "Times a publish waited for room (backpressure)."),
            ("meshscale_stream_replicate_failures", "replicate_failed",
             "Copies to a shard backup that failed (the next backup was tried)."),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], counters.get(key, 0))
            yield c
        g = GaugeMetricFamily("meshscale_stream_backlog_records", "Records a shard held "
                              "here still waits to have processed by its slowest operator, "
                              "by topic and the node the shard comes from (its name: stable "
                              "across restarts, so a restart makes no new series).",
                              labels=["topic", "source", "role"])
        c = CounterMetricFamily("meshscale_stream_cross_region_bytes", "Stream payload bytes "
                                "this node sent to or fetched from another region.",
                                labels=["label"])
        p = CounterMetricFamily("meshscale_stream_processed_records", "Records processed by "
                                "operator runners on this node.", labels=["operator"])
        if plane is not None:
            backlog: Counter[tuple[str, str, str]] = Counter()
            for (topic, source), log in plane.logs.items():
                role = "primary" if source == plane.source_id else "backup"
                # An earlier run's shard of the same node adds to the same series.
                backlog[(topic, split_source(source)[0], role)] += log.backlog()
            for labels, n in sorted(backlog.items()):
                g.add_metric(list(labels), n)
            for label, n in plane.cross_region_bytes.items():
                c.add_metric([label], n)
            for op, st in plane.op_stats.items():
                p.add_metric([op], st.get("records_processed", 0))
        yield g
        yield c
        yield p

    @staticmethod
    def _services(agent: ObservedNode) -> Iterator[Metric]:
        plane = agent.services
        m = plane.call_metrics if plane is not None else ServiceCallMetrics()
        labels = ["service", "method"]
        c = CounterMetricFamily(
            "meshscale_service_calls", "Service calls that entered at this node and ended, "
            f"by service, method (up to {MAX_METRIC_METHODS} pairs, then 'other') and "
            "outcome (done, raised, timeout, no-replica, replica-lost, ...).",
            labels=[*labels, "outcome"])
        for triple, n in sorted(m.calls.items()):
            c.add_metric(list(triple), n)
        yield c
        h = HistogramMetricFamily(
            "meshscale_service_call_latency_seconds", "Service calls that entered at this "
            "node: arrival to answer (routing, forwarding, retries included), by service "
            "and method.", labels=labels)
        for key, hist in sorted(m.latency.items()):
            h.add_metric(list(key), hist.buckets(), sum_value=hist.total)
        yield h
        g = GaugeMetricFamily("meshscale_service_inflight_calls", "Service calls that "
                              "entered at this node and are not answered yet.",
                              labels=labels)
        for key, n in sorted(m.inflight.items()):
            g.add_metric(list(key), n)
        yield g
        states = plane.replica_states() if plane is not None else {}
        g = GaugeMetricFamily("meshscale_service_replicas", "Replicas of each service on "
                              "this node, by state (starting, ready, unhealthy).",
                              labels=["service", "state"])
        r = GaugeMetricFamily("meshscale_service_replica_inflight_calls", "Calls queued or "
                              "running on this node's replica of each service.",
                              labels=["service"])
        for svc, (state, inflight) in sorted(states.items()):
            for each in ("starting", "ready", "unhealthy"):
                g.add_metric([svc, each], 1 if each == state else 0)
            r.add_metric([svc], inflight)
        yield g
        yield r
        counts: Mapping[str, int] = plane.stats if plane is not None else {}
        c = CounterMetricFamily("meshscale_service_health_checks_failed", "Health checks "
                                "of this node's replicas that failed or were not answered.")
        c.add_metric([], counts.get("health_checks_failed", 0))
        yield c
        c = CounterMetricFamily("meshscale_service_unhealthy_restarts", "Replicas this node "
                                "restarted because their health method failed in a row.")
        c.add_metric([], counts.get("replica_health_restarts", 0))
        yield c

    @staticmethod
    def _compute(obs: NodeObserver, agent: ObservedNode) -> Iterator[Metric]:
        compute = agent.compute
        sched = None if compute is None else compute.sched
        ld = sched.load() if sched is not None else None
        g = GaugeMetricFamily("meshscale_tasks", "Tasks on this node now, by state "
                              "(queued: reservations waiting for a slot).", labels=["state"])
        g.add_metric(["queued"], ld.queued if ld is not None else 0)
        g.add_metric(["running"], ld.running if ld is not None else 0)
        yield g
        cstats = compute.stats if compute is not None else {}
        c = CounterMetricFamily("meshscale_tasks_ended", "Tasks owned here that ended, by "
                                "state.", labels=["state"])
        for state in ("done", "failed", "cancelled"):
            c.add_metric([state], cstats.get("tasks_" + state, 0))
        yield c
        c = CounterMetricFamily("meshscale_tasks_submitted", "Tasks submitted to this node.")
        c.add_metric([], cstats.get("tasks_submitted", 0))
        yield c
        c = CounterMetricFamily("meshscale_task_retries", "Tasks re-run (lost worker/result).")
        c.add_metric([], cstats.get("resubmitted", 0))
        yield c
        yield obs.task_latency.family(
            "meshscale_task_latency_seconds", "Submit to outcome of tasks owned here, by "
            f"function (up to {MAX_METRIC_FUNCTIONS} names, then 'other') and outcome "
            "(done, failed, cancelled).")
        yield obs.queue_wait.family("meshscale_task_queue_wait_seconds",
                                    "Submit to binding on a worker node, tasks owned here.")
        c = CounterMetricFamily("meshscale_placement_decisions", "Task placements by reason.",
                                labels=["reason"])
        placements = Counter(obs.placements)
        sstats = sched.stats if sched is not None else {}
        for key, n in sstats.items():
            if key.startswith("submits_refused."):
                placements["refused_" + key.removeprefix("submits_refused.")] += n
        placements["infeasible"] += sstats.get("place_infeasible", 0)
        for reason in ("data_local", "lowest_cost", "delay_scheduled", "stolen"):
            placements.setdefault(reason, 0)
        for reason, n in sorted(placements.items()):
            c.add_metric([reason], n)
        yield c
