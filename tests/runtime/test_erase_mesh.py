"""Erasure on real node processes (4 nodes, 3 regions; one mesh for the module): classed
objects put, the class erased through the CLI; no copy is left in any node's store index
or on its disk, the receipt lists every copy that existed with the node that confirmed
it, verifies against the CA, and fails to once one byte of it is changed; the erasure is
in the coordinator's audit trail. Bad input (unknown class, malformed ids, a read-only
bundle, malformed or missing receipt files) gets one line and its documented exit code.
The Python API erases by id and by a KV key prefix. ``policy set --migrate`` moves copies,
those of a member that was down at the time too: it migrates its own when it is back."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest

from meshscale.cli import main as cli_main
from meshscale.client import connect
from meshscale.client.erasure import save_receipt, verify_receipt_file
from meshscale.client.mesh import MeshError
from meshscale.client.rpc import call
from meshscale.runtime.launcher import LocalMesh, node_command, spawn_node
from meshscale.trust.bundle import init_bundle, load_bundle, write_client_bundle
from meshscale.trust.receipts import verify_receipt
from stored import holds_copy
from waiting import wait_for

pytestmark = pytest.mark.timeout(300)

REGIONS = ["eu-west", "eu-central", "us-east"]
EU = {"eu-west", "eu-central"}


def oid_of(data: bytes) -> str:
    return "b3-" + blake3.blake3(data).hexdigest()  # independent of the code under test


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("erase-mesh"), 4, regions=REGIONS) as m:
        yield m


def cli(mesh: LocalMesh, *args: str, node: int = 0, bundle: Path | None = None) -> int:
    return cli_main([*args, "--node", mesh.nodes[node].address,
                     "--bundle", str(bundle or mesh.bundle_path)])


def disk_holders(mesh: LocalMesh, oid: str) -> set[str]:
    """Nodes with ``oid``'s bytes in their store, a file or inline (the disks, not the
    mesh's word)."""
    return {n.name for n in mesh.nodes
            if holds_copy(n.data_dir / "store", oid)}


def index_holders(mesh: LocalMesh, oid: str) -> set[str]:
    """Nodes whose store index lists ``oid`` (asked node to node: ``obj.local_stat``)."""
    return {n.name for n in mesh.nodes
            if call(n.address, mesh.node_credentials(0), "obj.local_stat", {"id": oid},
                    timeout=10) is not None}


def test_erase_a_class_everywhere_with_a_signed_receipt(
        mesh: LocalMesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set("gdpr", sorted(EU), replicas=2)
        datas = [f"customer record {k} ".encode() * (40 + k) for k in range(5)]
        datas.append(bytes(range(256)) * 4096)  # a chunked one (1 MiB)
        oids = [m.put(d, data_class="gdpr").id for d in datas]
        keep = m.put(b"not personal data " * 30).id  # unclassed: must survive
    assert oids == [oid_of(d) for d in datas]
    for oid in [*oids, keep]:
        wait_for(lambda o=oid: len(disk_holders(mesh, o)) >= (2 if o != keep else 1), 30,
                 f"{oid} stored")
    # A put that would widen the class's rule is refused (and audited): a refusal.
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m, \
            pytest.raises(MeshError):
        m.put(b"to the US " * 10, data_class="gdpr", residency=["us-east", "eu-west"])
    regions = {n.name: n.region for n in mesh.nodes}

    def by_region_on_disk() -> dict[str, int]:
        out: dict[str, int] = {}
        for oid in oids:
            for h in disk_holders(mesh, oid):
                out[regions[h]] = out.get(regions[h], 0) + 1
        return out

    # The residency report: copies by region as the disks hold them, none outside the
    # rule, the refusal counted, every chain verified.
    html = tmp_path / "report.html"

    def report() -> dict[str, Any] | None:
        code = cli(mesh, "compliance", "report", "--class", "gdpr", "--json",
                   "--html", str(html))
        got: dict[str, Any] = json.loads(capsys.readouterr().out)
        (cls,) = got["classes"]
        disk = by_region_on_disk()
        mine = {u["region"]: u["copies"] for u in cls["regions"]}
        return got if code == 0 and mine == disk else None

    got = wait_for(report, 30, "the report matching the disks")
    (cls,) = got["classes"]
    assert cls["objects"] == len(oids) and cls["out_of_rule"] == []
    assert cls["logical_bytes"] == sum(len(d) for d in datas)
    assert cls["stored_bytes"] == sum(len(d) * len(disk_holders(mesh, o))
                                      for d, o in zip(datas, oids, strict=True))
    assert set(cls["policy_regions"]) == EU and cls["refusals"] >= 1
    assert any("widens" in r["detail"] for r in got["refusals"])
    assert got["chains_ok"] and len(got["chains"]) == len(mesh.nodes)
    page = html.read_text()
    assert "<svg" in page and "<script" not in page and "Class gdpr" in page

    before = {oid: disk_holders(mesh, oid) for oid in oids}
    assert all({regions[h] for h in hs} <= EU for hs in before.values())

    out = tmp_path / "receipt.json"
    assert cli(mesh, "erase", "--class", "gdpr", "--out", str(out), node=2) == 0
    text = capsys.readouterr().out
    assert f"erased {len(oids)} objects" in text and "receipt erase-" in text

    # No copy left: not on any disk, not in any node's index; the unclassed object stays.
    for oid in oids:
        assert disk_holders(mesh, oid) == set(), oid
        assert index_holders(mesh, oid) == set(), oid
    assert disk_holders(mesh, keep)
    # Nor are the bytes of a small one left anywhere in a store's files: an inline copy
    # is in the index database, whose freed pages and write-ahead log would keep them.
    for n in mesh.nodes:
        for f in (n.data_dir / "store").rglob("*"):
            if f.is_file():
                raw = f.read_bytes()
                assert not [k for k, d in enumerate(datas[:5]) if d[:60] in raw], (n.name, f)

    # The receipt lists every copy that existed, each with the node that confirmed it.
    receipt, problems = verify_receipt_file(out, load_bundle(mesh.bundle_path).ca_cert_pem)
    assert problems == [] and receipt.body.complete
    body = receipt.body
    assert body.coordinator == mesh.nodes[2].name and body.requested_role == "admin"
    listed = {o.id: {c.node for c in o.copies} for o in body.objects}
    assert set(listed) == set(oids)
    for oid in oids:
        assert before[oid] <= listed[oid], (oid, before[oid], listed[oid])
    confirmed = {c.node: set(c.gone) for c in body.confirmations}
    for oid, nodes in listed.items():
        for node in nodes:
            assert oid in confirmed[node], (oid, node)
    assert all(o.delete_ts and o.data_class == "gdpr" for o in body.objects)

    assert cli(mesh, "erase", "verify", str(out)) == 0
    assert "complete" in capsys.readouterr().out

    # One byte changed anywhere that matters, or anywhere at all: it no longer verifies.
    raw = out.read_bytes()
    at = raw.index(b'"node": "') + len(b'"node": "')
    digit = raw.index(b'"size": ') + len(b'"size": ')
    while raw[digit + 1 : digit + 2].isdigit():
        digit += 1  # the last digit: flipping it leaves a number
    for pos, new in ((raw.index(oids[0].encode()) + 10, None), (at, None), (digit, None),
                     (raw.index(b"\n  "), b"\t")):
        flipped = bytearray(raw)
        flipped[pos] = (new or bytes([raw[pos] ^ 0x01]))[0]
        bad = tmp_path / "tampered.json"
        bad.write_bytes(bytes(flipped))
        assert cli(mesh, "erase", "verify", str(bad)) == 1, pos
        err = capsys.readouterr().err
        assert "does NOT verify" in err and err.count("\n") == 1, err
    # A receipt checked against another cluster's CA does not verify either.
    other = tmp_path / "other"
    init_bundle(other)
    with pytest.raises(ValueError, match="not issued by this cluster's CA"):
        verify_receipt(receipt, load_bundle(other).ca_cert_pem)

    # The erasure is audited on the coordinator, and each holder's confirmation on it.
    rows = call(mesh.nodes[2].address, mesh.credentials(), "audit.query",
                {"subject": body.receipt_id, "kind": "erase"}, timeout=10)["rows"]
    assert any(r["data_class"] == "gdpr" and "complete" in r["detail"]
               and r["role"] == "admin" for r in rows), rows
    for c in body.confirmations:
        i = next(k for k, n in enumerate(mesh.nodes) if n.name == c.node)
        got = call(mesh.nodes[i].address, mesh.credentials(), "audit.query",
                   {"subject": body.receipt_id, "kind": "erase"}, timeout=10)["rows"]
        assert any("confirmed" in r["detail"] for r in got), (c.node, got)


def test_bad_erase_input(mesh: LocalMesh, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    def one_line_error(code: int, *args: str, bundle: Path | None = None) -> str:
        assert cli(mesh, *args, bundle=bundle) == code, args
        err = capsys.readouterr().err
        assert err.startswith("meshscale: error: ") and err.count("\n") == 1, err
        return err

    assert "unknown data class 'nosuch'" in one_line_error(2, "erase", "--class", "nosuch")
    assert "not an object id" in one_line_error(2, "erase", "b3-xyz")
    assert "name a data class" in one_line_error(2, "erase")
    assert "not under class" in one_line_error(2, "erase", "--class", "gdpr",
                                               "--key-prefix", "other/x")
    assert "no live node holds" in one_line_error(1, "erase", oid_of(b"never stored"))
    # A read-only bundle may not erase: refused, nothing deleted.
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as m:
        m.policies.set("gdpr", sorted(EU), replicas=2)
        ref = m.put(b"still here " * 20, data_class="gdpr")
    viewer = write_client_bundle(load_bundle(mesh.admin_path), "viewer", tmp_path / "viewer",
                                 read_only=True).path
    err = one_line_error(2, "erase", "--class", "gdpr", bundle=viewer)
    assert "read-only" in err and "erase.run" in err
    with connect(mesh.nodes[1].address, bundle=mesh.bundle_path) as m:
        assert m.get(ref) == b"still here " * 20
    # Receipt files: malformed (2), missing (1), a directory (2).
    junk = tmp_path / "junk.json"
    junk.write_text('{"body": 1}')
    assert "not an erasure receipt" in one_line_error(2, "erase", "verify", str(junk))
    assert "no such file" in one_line_error(1, "erase", "verify", str(tmp_path / "nope.json"))
    one_line_error(2, "erase", "verify", str(tmp_path))
    one_line_error(2, "erase", "verify")


def test_erase_from_python_by_id_and_by_key_prefix(mesh: LocalMesh, tmp_path: Path) -> None:
    ca = load_bundle(mesh.bundle_path).ca_cert_pem
    with connect(mesh.nodes[3].address, bundle=mesh.bundle_path) as m:
        m.policies.set("gdpr", sorted(EU), replicas=2)
        a = m.put(b"alice " * 50, data_class="gdpr")
        b = m.put(b"bob " * 50, data_class="gdpr")
        m.kv.put("gdpr/customer/alice", a.id.encode())
        m.kv.put("gdpr/customer/alice-note", b"plain text")
        m.kv.put("gdpr/customer/bob", b.id.encode())
        wait_for(lambda: len(disk_holders(mesh, a.id)) >= 2, 30, "alice stored")
        receipt = m.erase(data_class="gdpr", key_prefix="gdpr/customer/alice")
        assert [o.id for o in receipt.body.objects] == [a.id]
        assert sorted(k.key for k in receipt.body.keys) == ["gdpr/customer/alice",
                                                            "gdpr/customer/alice-note"]
        assert verify_receipt(receipt, ca) == []
        assert disk_holders(mesh, a.id) == set()
        assert m.kv.get("gdpr/customer/alice") is None
        assert m.kv.get("gdpr/customer/bob") == b.id
        assert m.get(b) == b"bob " * 50
        # By id; the saved file verifies as the in-memory receipt does.
        receipt = m.erase(b)
        path = save_receipt(receipt, tmp_path / "r.json")
        assert verify_receipt_file(path, ca)[1] == []
        assert json.loads(path.read_text())["body"]["objects"][0]["id"] == b.id
        wait_for(lambda: disk_holders(mesh, b.id) == set(), 10, "bob gone")
        with pytest.raises(ValueError, match="not an object id"):
            m.erase("nonsense")
        with pytest.raises(MeshError) as e:
            m.erase(b)  # already gone
        assert e.value.code == "not_found"


def test_policy_set_migrate_moves_copies_by_re_replication(
        mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    regions = {n.name: n.region for n in mesh.nodes}
    with connect(mesh.nodes[2].address, bundle=mesh.bundle_path) as m:
        m.policies.set("moving", sorted(EU), replicas=2)
        datas = [f"moving record {k} ".encode() * (30 + k) for k in range(4)]
        refs = [m.put(d, data_class="moving") for d in datas]
    for r in refs:
        wait_for(lambda o=r.id: len(disk_holders(mesh, o)) >= 2, 30, f"{r.id} stored")
    assert any("eu-central" in {regions[h] for h in disk_holders(mesh, r.id)} for r in refs)
    # Narrowing to eu-west breaks the eu-central copies: refused without --migrate ...
    assert cli(mesh, "policy", "set", "moving", "--regions", "eu-west", "--replicas", "2") == 2
    assert "would be outside regions" in capsys.readouterr().err
    # ... moved with it, through re-replication, and reported.
    assert cli(mesh, "policy", "set", "moving", "--regions", "eu-west", "--replicas", "2",
               "--migrate", node=1) == 0
    out = capsys.readouterr().out
    assert "migrated " in out and "from eu-central" in out and "now in eu-west" in out
    for r in refs:
        wait_for(lambda o=r.id: {regions[h] for h in disk_holders(mesh, o)} == {"eu-west"}
                 and len(disk_holders(mesh, o)) == 2, 30, f"{r.id} only in eu-west")
    with connect(mesh.nodes[2].address, bundle=mesh.bundle_path) as m:
        assert [m.get(r) for r in refs] == datas
        assert set(m.stat(refs[0]).residency or ()) == {"eu-west"}
    # Audited where each copy's rule was rewritten; the report finds nothing outside.
    rows = [row for n in mesh.nodes
            for row in call(n.address, mesh.credentials(), "audit.query",
                            {"kind": "policy_change", "data_class": "moving"},
                            timeout=10)["rows"]]
    assert any("policy migrate" in row["detail"] for row in rows), rows
    assert any("migrated" in row["detail"] for row in rows), rows
    assert cli(mesh, "compliance", "report", "--class", "moving", "--json") == 0
    (cls,) = json.loads(capsys.readouterr().out)["classes"]
    assert cls["out_of_rule"] == [] and [u["region"] for u in cls["regions"]] == ["eu-west"]


def test_a_member_down_for_a_migration_migrates_its_copies_when_back(
        mesh: LocalMesh, capsys: pytest.CaptureFixture[str]) -> None:
    # `policy set --migrate` asks the members that answer then; one that is down rewrites
    # its own copies when its policy cache reads the new rule (runtime/data/policy.py).
    regions = {n.name: n.region for n in mesh.nodes}
    with connect(mesh.nodes[0].address, bundle=mesh.bundle_path) as m:
        m.policies.set("latecomer", sorted(EU), replicas=2)
        datas = [f"latecomer record {k} ".encode() * (40 + k) for k in range(8)]
        refs = [m.put(d, data_class="latecomer") for d in datas]
    for r in refs:
        wait_for(lambda o=r.id: len(disk_holders(mesh, o)) >= 2, 30, f"{r.id} stored")
    victim = next(n for n in mesh.nodes if n.region == "eu-central")
    held = [r.id for r in refs if victim.name in disk_holders(mesh, r.id)]
    assert held, "the eu-central node holds none of the class's copies: nothing to test"
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    other = next(i for i, n in enumerate(mesh.nodes) if n.region == "eu-west")
    assert cli(mesh, "policy", "set", "latecomer", "--regions", "eu-west", "--replicas", "2",
               "--migrate", node=other) == 0
    capsys.readouterr()
    # Its copies, on its disk, still under the old rule: it comes back with them.
    assert all(victim.name in disk_holders(mesh, oid) for oid in held)
    cmd = node_command(victim, [mesh.nodes[other].address], "")
    victim.proc = spawn_node(cmd, victim.data_dir.parent / f"{victim.name}-latecomer.log")
    for oid in held:
        wait_for(lambda o=oid: {regions[h] for h in disk_holders(mesh, o)} == {"eu-west"}
                 and len(disk_holders(mesh, o)) == 2, 60, f"{oid} only in eu-west")
    with connect(mesh.nodes[other].address, bundle=mesh.bundle_path) as m:
        assert [m.get(r) for r in refs] == datas
    rows = call(victim.address, mesh.credentials(), "audit.query",
                {"kind": "policy_change", "data_class": "latecomer"}, timeout=10)["rows"]
    assert any("policy refresh" in row["detail"] for row in rows), rows
