"""``meshscale node start``: the node's settings, from a TOML file and flags, and the agent.

Every setting is declared once, in ``OPTIONS``: its flag, its key in the config file, its
type, default and help. From that one table come the options of ``meshscale node start``
(typer, in ``cli.py``), the checks of a ``--config node.toml`` file (read with the
standard library's ``tomllib``), the files ``LocalMesh`` writes (``to_toml``) and the
commented example that ``meshscale node config-example`` prints. Flags override the file;
the file overrides the defaults (``merge``).

``python -m meshscale.runtime.agent_main --config FILE`` (exactly that, no flags) runs a
node without loading the CLI framework (typer, click, rich and pydantic: ~12 MB of RSS
per node process); ``LocalMesh`` (``meshscale up``, the demo, the tests) starts its nodes
this way, with a config file per node.

Bad input (a flag, a config key or value, a bundle) gets one line on stderr
(``meshscale: error: ...``) and exit code 2; a port that cannot be bound or a store that
cannot be opened exits 1; a node that was removed from the mesh exits 78.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "meshscale"
LAUNCHER_USAGE = "python -m meshscale.runtime.agent_main --config FILE"
BUNDLE_ENV = "MESHSCALE_BUNDLE"
USAGE_EXIT = 2
EXIT_REMOVED = 78
"""Exit status of a node removed from the mesh (``meshscale node remove``): it stops and
will not start again (EX_CONFIG; the systemd unit does not restart on it)."""
MAX_CONFIG_BYTES = 1024 * 1024
LATENCY_HELP = (
    "Emulated inter-region RTT, e.g. eu-west:us-east=80ms (repeat or comma-separate). "
    "Sends to a member of another region are delayed by RTT/2 in this process. For "
    "trying a geo-distributed mesh on one machine; off by default, never use in production."
)


class StartError(Exception):
    """A one-line error; ``exit_code`` 2 for bad input, 1 for failures."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Option:
    """One setting of a node: ``--flag`` on the command line, ``key`` in the file."""

    key: str
    kind: str
    """``str``, ``path``, ``int``, ``float``, ``bool``, ``list`` (of strings) or ``table``
    (of strings: ``[labels]`` in the file, ``--label K=V`` repeated on the command line)."""
    default: Any
    help: str
    flag: str = ""
    example: Any = None
    """What the example file shows, where the default is empty."""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("bundle", "path", None, "Node bundle directory (made by `meshscale bundle node`). "
           f"Env {BUNDLE_ENV} when neither the flag nor the file sets it.",
           example="/etc/meshscale/bundle"),
    Option("data_dir", "path", None, "Node data directory: identity, objects, KV, task "
           "records, removed nodes. Required.", example="/var/lib/meshscale"),
    Option("name", "str", None, "Node name; must be the bundle's (default: the bundle's).",
           example="edge-a-1"),
    Option("region", "str", "", "Region this node runs in.", example="eu-west"),
    Option("zone", "str", "", "Zone (failure domain) in the region.", example="eu-west-1a"),
    Option("labels", "table", {}, "Labels tasks and services can ask for: KEY=VALUE.",
           flag="--label", example={"site": "factory-3"}),
    Option("bind", "str", "127.0.0.1:7946", "HOST:PORT for UDP gossip and TCP (TLS) streams.",
           example="0.0.0.0:7946"),
    Option("advertise", "str", None, "HOST:PORT other nodes reach this one at (default: "
           "--bind; needed when binding a wildcard address).", example="10.0.1.11:7946"),
    Option("join", "list", [], "HOST:PORT of members to join through (seed addresses).",
           example=["10.0.1.12:7946", "10.0.2.11:7946"]),
    Option("http", "str", None, "HOST:PORT for the HTTP API, /metrics and the dashboard "
           "(off unless set).", example="127.0.0.1:8946"),
    Option("metrics_public", "bool", False, "Serve /metrics without the token (for a "
           "scraper)."),
    Option("http_insecure", "bool", False, "Serve the HTTP API in plain HTTP on an address "
           "beyond loopback (by default it is HTTPS there, with the node's certificate)."),
    Option("cpus", "int", None, "Worker slots (and the CPU capacity placement counts on); "
           "default: the machine's CPU count, or env MESHSCALE_CPUS.", example=4),
    Option("memory_mb", "int", None, "Memory capacity placement counts on, in MB; default: "
           "the machine's.", example=8192),
    Option("task_timeout_s", "int", 3600, "A task without its own timeout_s is stopped "
           "after this many seconds (so never-ending tasks cannot hold every slot)."),
    Option("task_memory_mb", "int", None, "A task without its own memory_mb may grow by "
           "this much; default: the machine's memory divided by the worker slots.",
           example=2048),
    Option("task_log_bytes", "int", 65536, "What one task prints to stdout, and to "
           "stderr, kept with its record (fut.logs(), meshscale logs); beyond it the output "
           "is cut and the cut is said."),
    Option("worker_user", "str", "nobody", "When the node runs as root, task workers run "
           "as this user, so task code cannot read the node's bundle or data dir ('' runs "
           "them as root). A dedicated user (e.g. meshscale-worker) is better than nobody, "
           "which other daemons share. An agent that is not root cannot change user: its "
           "workers run as itself, and it logs so at start."),
    Option("create_worker_user", "bool", False, "Create worker_user (useradd --system) if "
           "it does not exist."),
    Option("disk_reserve_mb", "int", None, "Free space the data dir keeps, in MB: object "
           "and KV writes that would eat into it are refused (deletes still work); default "
           "64.", example=1024),
    Option("max_pending_tasks", "int", 10_000, "Tasks this node owns and has no result "
           "for; a submit beyond it is refused as busy (clients wait and send it again)."),
    Option("task_run_timeout_s", "float", 60.0, "A task this node owns whose worker "
           "neither reports a result nor says it still runs it (every third of this, at "
           "most 20 s) for this long is run again elsewhere (its binding counts as lost)."),
    Option("max_task_records", "int", 10_000, "Ended task records this node keeps in "
           "memory for `tasks` and result questions, about 550 bytes each (the oldest "
           "beyond it are answered from the replicated KV, on disk)."),
    Option("task_record_window_s", "float", 0.05, "The longest a task's final record waits "
           "to be written to the replicated KV together with others (one batch, one round "
           "per replica); an owner that dies within it leaves the task to run again where "
           "it is taken over."),
    Option("task_submit_grace_s", "float", 0.005, "How long a small submit of short tasks "
           "waits for them to end before it is answered, so a task that ends at once is "
           "answered with its outcome and written once (its final record, which then "
           "waits up to task_record_window_s for others); 0: never."),
    Option("repair_busy_mb_per_s", "float", 16.0, "While tasks run on this node (and 2 s "
           "after), the copies it sends to restore replicas (after a node's death, a "
           "handoff) go at most this fast, in MiB/s, so they do not take the cores the "
           "tasks need (Ceph's recovery limits); 0: unpaced. Idle, they go at full speed."),
    Option("repair_busy_max_transfers", "int", 1, "While tasks run on this node, how many "
           "of those copies it sends at once (idle: 8)."),
    Option("stream_max_backlog", "int", 2000, "Records a stream shard holds for its slowest "
           "operator before producers wait (backpressure)."),
    Option("power_source", "str", "auto", "Where the node's power figures come from: "
           "rapl (the machine's RAPL counters; refused at start if none is readable), model "
           "(idle_watts to peak_watts by the node's CPU utilisation) or auto (rapl when "
           "readable, else model). `meshscale energy` says which each node used."),
    Option("idle_watts", "float", 10.0, "Power model: the node's draw with its CPUs idle."),
    Option("peak_watts", "float", 65.0, "Power model: the draw with every CPU busy (at "
           "least idle_watts)."),
    Option("standby_watts", "float", 2.0, "Power model: the draw on standby (at most "
           "idle_watts)."),
    Option("power_rapl_dir", "path", "/sys/class/powercap", "Where the RAPL counters are "
           "(for a machine that mounts sysfs elsewhere)."),
    Option("energy_mode", "str", "off", "Capacity on demand: off (every node stays "
           "active) or consolidate (idle nodes drain, stop their workers and sleep while "
           "the rest of their region keeps its headroom and minimums; they wake when work "
           "needs them). Every node of a region should use the same energy_* settings."),
    Option("energy_min_active_per_region", "int", 2, "Consolidation never leaves a region "
           "with fewer active nodes than this."),
    Option("energy_min_active_per_zone", "int", 1, "Nor a zone with fewer than this."),
    Option("energy_min_active", "table", {}, "Per-region minimums that override "
           "energy_min_active_per_region: REGION=N.", flag="--energy-min-active",
           example={"eu-west": "3"}),
    Option("energy_headroom_fraction", "float", 0.3, "Share of a region's serving worker "
           "slots kept free: below it, draining nodes return and sleeping ones wake."),
    Option("energy_hysteresis_fraction", "float", 0.1, "A node drains only if the rest "
           "keeps headroom plus this much free (so load near the line does not flap)."),
    Option("energy_min_dwell_s", "float", 300.0, "Seconds a node stays active (after its "
           "start or a wake) before it may drain."),
    Option("energy_drain_confirm_s", "float", 10.0, "Least seconds of draining before "
           "standby (longer than gossip takes to spread a state)."),
    Option("energy_max_drain_s", "float", 600.0, "A drain whose tasks have not ended "
           "after this many seconds is given up."),
    Option("energy_interval_s", "float", 1.0, "Seconds between two consolidation "
           "decisions of this node."),
    Option("no_standby", "bool", False, "Pin this node: it never drains or sleeps "
           "(consolidation counts it as always active)."),
    Option("latency", "list", [], LATENCY_HELP, example=["eu-west:us-east=80ms"]),
    Option("suspicion_mult", "float", 1.5, "Failure detection: a suspected member is "
           "declared dead after at least suspicion_mult x log10(members) x the 0.75 s probe "
           "interval (4 times that with no one confirming). Raise it on lossy links; every "
           "node should use the same value."),
    Option("no_audit", "bool", False, "Keep no audit trail (docs/audit.md): nothing this "
           "node does to data is recorded. For measuring what the trail costs."),
    Option("audit_segment_bytes", "int", 4 * 1024 * 1024, "The audit trail's segment "
           "files grow to about this many bytes before the next one starts."),
    Option("audit_max_segments", "int", 16, "Audit segments kept; the oldest are deleted "
           "beyond it (the trail's disk use is about segment bytes times this)."),
    Option("audit_head_interval_s", "float", 10.0, "Seconds between signing the audit "
           "chain's head and gossiping it."),
)
BY_KEY = {o.key: o for o in OPTIONS}
BOUNDS: dict[str, tuple[float, float]] = {
    "task_timeout_s": (1, 30 * 86400),
    "task_memory_mb": (16, 1 << 30),
    "task_log_bytes": (1, 256 * 1024),  # both streams fit one KV value (1 MiB)
    "disk_reserve_mb": (0, 1 << 40),
    "stream_max_backlog": (1, 1_000_000),
    "max_pending_tasks": (1, 10_000_000),
    "max_task_records": (1, 10_000_000),
    "task_run_timeout_s": (1, 86400),
    "task_record_window_s": (0, 60),
    "task_submit_grace_s": (0, 10),
    "repair_busy_mb_per_s": (0, 1 << 20),
    "repair_busy_max_transfers": (1, 64),
    "cpus": (1, 4096),
    "memory_mb": (1, 1 << 40),
    "audit_segment_bytes": (4096, 1 << 34),
    "audit_max_segments": (1, 1_000_000),
    "audit_head_interval_s": (0.1, 86400),
    "energy_interval_s": (0.05, 3600),
    "suspicion_mult": (0.5, 1000),
}


def _type_ok(o: Option, value: Any) -> bool:
    if o.kind in ("str", "path"):
        return isinstance(value, str)
    if o.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if o.kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if o.kind == "bool":
        return isinstance(value, bool)
    if o.kind == "list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


_KIND_NAMES = {"str": "a string", "path": "a path (string)", "int": "an integer",
               "float": "a number", "bool": "true or false", "list": "a list of strings",
               "table": "a table of strings"}


def check_value(key: str, value: Any, where: str) -> None:
    """``StartError`` (``where: ...``) unless ``key`` is a setting and ``value`` has its
    type as a TOML file would give it."""
    o = BY_KEY.get(key)
    if o is None:
        raise StartError(f"{where}: unknown key {key!r} (`meshscale node config-example` "
                         "lists every key)")
    if not _type_ok(o, value):
        raise StartError(f"{where}: {key!r} must be {_KIND_NAMES[o.kind]}, not "
                         f"{type(value).__name__}")


def read_config(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, checked against ``OPTIONS``; ``StartError`` naming
    the file and the key for an unknown key or a wrong type."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise StartError(f"--config {path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise StartError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StartError(f"--config {path}: not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        check_value(key, value, f"--config {path}")
        if BY_KEY[key].kind == "path":
            # Relative paths in a file are relative to the file, as in systemd and Nomad.
            value = (Path(path).parent / Path(value).expanduser()).resolve()
        out[key] = value
    return out


@dataclass
class Settings:
    """A node's settings after the file, the flags and the defaults are merged."""

    values: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None


def merge(given: Mapping[str, Any], config: Path | None = None) -> Settings:
    """A node's settings: ``given`` (what the flags set, already parsed: a table as a
    dict, a bool flag only when set) over the ``config`` file over the defaults, then
    ``MESHSCALE_BUNDLE`` for a bundle neither sets, then the bounds. ``StartError``."""
    from_file = read_config(config) if config is not None else {}
    values: dict[str, Any] = {}
    for o in OPTIONS:
        flag = given.get(o.key)
        if flag is not None and flag is not False and flag != []:
            values[o.key] = flag
        elif o.key in from_file:
            values[o.key] = from_file[o.key]
        else:
            values[o.key] = o.default
    if values["bundle"] is None and os.environ.get(BUNDLE_ENV):
        values["bundle"] = Path(os.environ[BUNDLE_ENV])
    for key, (lo, hi) in BOUNDS.items():
        v = values[key]
        if v is not None and not lo <= v <= hi:
            raise StartError(f"{BY_KEY[key].option} must be in {lo}..{hi}, not {v}")
    return Settings(values)


def config_example() -> str:
    """A commented TOML file with every key: the defaults, and examples where the default
    is empty (commented out)."""
    lines = ["# meshscale node configuration (TOML). A node needs bundle (or MESHSCALE_BUNDLE)",
             "# and data_dir; the rest have defaults. A flag of the same name (underscores as",
             "# dashes; --label KEY=VALUE for [labels]) overrides the file.",
             "# `meshscale node start --config node.toml`.", ""]
    # Tables last: in TOML every key after a [table] header belongs to that table.
    for o in sorted(OPTIONS, key=lambda o: o.kind == "table"):
        lines += [f"# {line}" for line in _wrap(o.help)]
        commented = o.default in (None, [], {})
        value = o.example if commented else o.default
        c = "# " if commented else ""
        if o.kind == "table":
            lines += [f"{c}[{o.key}]"] + [f"{c}{k} = {_toml(v)}" for k, v in value.items()]
        else:
            lines.append(f"{c}{o.key} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def to_toml(values: Mapping[str, Any]) -> str:
    """A node config file setting ``values`` (keys of ``OPTIONS``, each checked as
    ``read_config`` would; paths as strings or ``Path``), for ``--config``."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, Path):
            value = str(value)
        check_value(key, value, "node settings")
        if BY_KEY[key].kind == "table":
            tables += ["", f"[{key}]"] + [f"{_toml(k)} = {_toml(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join([*lines, *tables, ""])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    # A JSON string is a TOML basic string, once DEL (which JSON leaves) is escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _wrap(text: str, width: int = 86) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*out, line] if line else out


def parse_addr(value: str, flag: str) -> str:
    """``HOST:PORT`` normalised, or ``StartError`` naming the flag."""
    from meshscale.transport.framing import split_addr

    try:
        host, port = split_addr(value)
    except ValueError as e:
        raise StartError(f"{flag}: {e}") from None
    return f"{host}:{port}"


def require_ip(addr: str, flag: str) -> None:
    """The address others reach this node at must be an IP address: every node sends it
    datagrams as written, and a name would have to be resolved by each of them on every
    send (a name there used to break gossip for the whole mesh). Seeds (``--join``) may
    be names: they are only dialled over TCP."""
    import ipaddress
    import socket

    host = addr.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            hint = f" ({host} resolves to {infos[0][4][0]})" if infos else ""
        except OSError:
            hint = f" ({host} does not resolve)"
        raise StartError(f"{flag} {addr}: other nodes reach this one at this address, so it "
                         f"must be an IP address, not a name{hint}") from None


def is_loopback(addr: str) -> bool:
    """Is ``HOST:PORT`` on the loopback network (127.0.0.0/8, ::1, localhost)? Anything
    else, wildcards included, is reachable from other machines."""
    import ipaddress

    host = addr.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_labels(labels: Sequence[str] | None, flag: str = "--label") -> dict[str, str]:
    """``KEY=VALUE`` items (``--label``, or another table option's ``flag``) as a dict."""
    out: dict[str, str] = {}
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StartError(f"invalid {flag} {item!r}: use KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def power_settings(source: str, idle_watts: float, peak_watts: float, standby_watts: float,
                   rapl_dir: Path | str) -> Any:
    """The node's ``PowerConfig``, checked: a model with idle above peak, negative or
    non-finite watts, or an unknown source is refused naming its key."""
    from meshscale.core.capacity import CapacityConfigError, PowerModel
    from meshscale.runtime.config import PowerConfig
    from meshscale.runtime.power import POWER_SOURCES

    if source not in POWER_SOURCES:
        raise StartError(f"power_source: {source!r} is not one of {', '.join(POWER_SOURCES)}")
    try:
        model = PowerModel(idle_watts=float(idle_watts), peak_watts=float(peak_watts),
                           standby_watts=float(standby_watts))
    except CapacityConfigError as e:
        raise StartError(str(e).replace("energy.", "")) from None
    if source == "rapl":
        from meshscale.runtime.power import RaplReader

        if not RaplReader(Path(rapl_dir)).available:
            raise StartError(f"power_source: rapl, but no RAPL package counter under "
                             f"{rapl_dir} is readable (use auto or model)")
    return PowerConfig(model=model, source=source, rapl_dir=Path(rapl_dir))


def energy_settings(s: Settings) -> Any:
    """The node's ``CapacitySettings`` from the ``energy_*`` options, checked: a bad
    value is refused naming its key (a per-region minimum that is not a whole number, a
    fraction out of range, an unknown mode)."""
    from meshscale.core.capacity import CapacityConfig, CapacityConfigError
    from meshscale.runtime.config import CapacitySettings

    by_region: dict[str, int] = {}
    for region, text in dict(s.energy_min_active).items():
        try:
            by_region[region] = int(str(text))
        except ValueError:
            raise StartError(f"energy_min_active.{region}: must be a whole number, got "
                             f"{text!r}") from None
    try:
        config = CapacityConfig(
            mode=s.energy_mode,
            headroom_fraction=float(s.energy_headroom_fraction),
            hysteresis_fraction=float(s.energy_hysteresis_fraction),
            min_active_per_region=s.energy_min_active_per_region,
            min_active_per_zone=s.energy_min_active_per_zone,
            min_active_by_region=by_region,
            min_dwell_s=float(s.energy_min_dwell_s),
            drain_confirm_s=float(s.energy_drain_confirm_s),
            max_drain_s=float(s.energy_max_drain_s))
    except CapacityConfigError as e:
        key = e.key.replace("energy.min_active_by_region.", "energy_min_active.")
        key = key.replace("energy.", "energy_")
        raise StartError(f"{key}: {str(e).split(': ', 1)[1]}") from None
    return CapacitySettings(config=config, pinned=bool(s.no_standby),
                            interval_s=float(s.energy_interval_s))


def start(s: Settings) -> None:
    """Build the agent of settings ``s`` (``merge``) and run it until SIGTERM/SIGINT.
    Raises ``StartError``."""
    from meshscale.core.membership import NodeMeta
    from meshscale.runtime.config import AuditConfig
    from meshscale.runtime.identity import IdentityError, start_identity
    from meshscale.runtime.latency import parse_latency
    from meshscale.runtime.node import (
        AgentConfig,
        NodeAgent,
        NodeRemovedError,
        membership_config,
        run_forever,
    )
    from meshscale.transport.credentials import check_not_expired
    from meshscale.transport.tls import TLSConfigError
    from meshscale.trust.bundle import NODE_NAME_RE, BundleError, BundleKind, load_bundle
    from meshscale.trust.keyring import KeyringError
    from meshscale.trust.revocation import RevocationError

    if s.bundle is None:
        raise StartError(f"missing --bundle DIR (or `bundle` in --config, or {BUNDLE_ENV})")
    if s.data_dir is None:
        raise StartError("missing --data-dir DIR (or `data_dir` in --config)")
    bind = parse_addr(s.bind, "--bind")
    http = None if s.http is None else parse_addr(s.http, "--http")
    if s.metrics_public and http is None:
        raise StartError("--metrics-public needs --http HOST:PORT")
    if s.http_insecure and http is None:
        raise StartError("--http-insecure needs --http HOST:PORT")
    http_tls = http is not None and not s.http_insecure and not is_loopback(http)
    host = bind.rpartition(":")[0]
    advertise = None
    if s.advertise is not None:
        advertise = parse_addr(s.advertise, "--advertise")
    elif host in ("0.0.0.0", "::"):
        raise StartError("--bind on a wildcard address needs --advertise IP:PORT")
    require_ip(advertise or bind, "--advertise" if advertise else "--bind")
    seeds = [parse_addr(j, "--join") for j in s.join]
    try:
        emulated = parse_latency(s.latency)
    except ValueError as e:
        raise StartError(f"--latency: {e}") from None
    power = power_settings(s.power_source, s.idle_watts, s.peak_watts, s.standby_watts,
                           s.power_rapl_dir)
    energy = energy_settings(s)
    capacity = {k: float(v) for k, v in (("cpus", s.cpus), ("memory_mb", s.memory_mb))
                if v is not None}
    meta = NodeMeta(region=s.region, zone=s.zone, labels=dict(s.labels), capacity=capacity)
    if s.name is not None and not NODE_NAME_RE.match(s.name):
        raise StartError(f"invalid node name {s.name!r}: use 1-63 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    try:
        loaded = load_bundle(s.bundle).require(BundleKind.NODE, use="`node start`")
        check_not_expired(loaded)
        if s.name is not None and s.name != loaded.name:
            raise StartError(f"--name {s.name!r} is not the bundle's node ({loaded.name!r})")
        identity = start_identity(s.data_dir, loaded.name)
        agent = NodeAgent(
            identity=identity,
            config=membership_config(float(s.suspicion_mult)),
            data_dir=s.data_dir,
            bundle=loaded,
            bind=bind,
            advertise=advertise,
            meta=meta,
            seeds=seeds,
            emulated_latency=emulated,
            agent_config=AgentConfig(http=http, http_tls=http_tls,
                                     disk_reserve_mb=s.disk_reserve_mb,
                                     task_timeout_s=float(s.task_timeout_s),
                                     task_memory_mb=s.task_memory_mb,
                                     task_log_bytes=s.task_log_bytes,
                                     worker_user=s.worker_user,
                                     create_worker_user=s.create_worker_user,
                                     metrics_public=s.metrics_public,
                                     stream_max_backlog=s.stream_max_backlog,
                                     max_pending_tasks=s.max_pending_tasks,
                                     max_task_records=s.max_task_records,
                                     task_run_timeout_s=float(s.task_run_timeout_s),
                                     task_record_window_s=float(s.task_record_window_s),
                                     task_submit_grace_s=float(s.task_submit_grace_s),
                                     repair_busy_mb_per_s=float(s.repair_busy_mb_per_s),
                                     repair_busy_max_transfers=s.repair_busy_max_transfers,
                                     power=power,
                                     energy=energy,
                                     audit=AuditConfig(
                                         enabled=not s.no_audit,
                                         segment_bytes=s.audit_segment_bytes,
                                         max_segments=s.audit_max_segments,
                                         head_interval_s=float(s.audit_head_interval_s))),
        )
    except NodeRemovedError as e:
        raise StartError(str(e), exit_code=EXIT_REMOVED) from None
    except (BundleError, KeyringError, IdentityError, TLSConfigError, RevocationError,
            ValueError) as e:
        raise StartError(str(e)) from None
    from meshscale.runtime.isolation import IsolationError
    from meshscale.runtime.storage import StorageError

    try:
        run_forever(agent)
    except NodeRemovedError as e:
        raise StartError(str(e), exit_code=EXIT_REMOVED) from None
    except IsolationError as e:  # worker_user, or a secret the worker user could read
        raise StartError(str(e)) from None
    except StorageError as e:  # the store under --data-dir cannot be used as it is
        raise StartError(str(e), exit_code=1) from None
    except OSError as e:
        where = bind if http is None else f"{bind} (or --http {http})"
        raise StartError(f"cannot listen on {where}: {e.strerror or e}", exit_code=1) from None


def error_line(e: StartError) -> str:
    """The one line ``e`` is reported as (without the ``meshscale: error:`` prefix)."""
    return " ".join(str(e).split())


def run(argv: Sequence[str]) -> int:
    """The lean launcher: ``argv`` must be exactly ``--config FILE`` (flags are
    ``meshscale node start``'s). Runs the node; errors are one line on stderr; returns
    the exit code."""
    try:
        if len(argv) != 2 or argv[0] != "--config" or not argv[1]:
            raise StartError(f"usage: {LAUNCHER_USAGE} (this launcher takes a config file "
                             "only; `meshscale node start` takes flags)")
        start(merge({}, Path(argv[1])))
    except StartError as e:
        sys.stderr.write(f"{PROG}: error: {error_line(e)}\n")
        sys.stderr.flush()
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
