"""``runtime.services.refusal`` takes any log field name: a plane that passes ``node=`` or
``rule=`` as a field must get its refusal, not a TypeError in the middle of its pump (a
scheduler pump once stalled on ``node=``)."""

from __future__ import annotations

from typing import Any, cast

from meshscale.core.api.errors import ApiError
from meshscale.runtime.node import JsonLog
from meshscale.runtime.services import NodeServices, refusal


class _Node:
    def __init__(self) -> None:
        self.records: list[tuple[Any, str, dict[str, Any]]] = []
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def record(self, kind: Any, subject: str, **kw: Any) -> None:
        self.records.append((kind, subject, kw))

    def log_limited(self, event: str, /, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_any_field_name_is_a_log_field_and_the_refusals_own_fields_win() -> None:
    node = _Node()
    counts: list[str] = []
    err = refusal(cast(NodeServices, node), counts.append, "residency", "not here",
                  subject="obj-1", data_class="pii", from_region="us-east",
                  node="node-7", rule="forged", count=3, message="forged")
    assert isinstance(err, ApiError) and "refused: not here" in str(err)
    assert counts == ["refusals", "refused_residency"]
    (event, fields), = node.lines
    assert event == "refused"
    assert fields["node"] == "node-7" and fields["count"] == 3
    assert fields["rule"] == "residency" and fields["message"] == "not here"
    assert node.records[0][1] == "obj-1" and node.records[0][2]["data_class"] == "pii"


def test_a_json_log_line_takes_level_and_event_as_fields() -> None:
    import io
    out = io.StringIO()
    JsonLog("node-0", out)("info", "x", event="y", level="z")
    assert '"event": "y"' in out.getvalue()
