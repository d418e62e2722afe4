"""The node's data plane, one room per file: ``plane.py`` (the ``DataPlane`` that starts
them and serves their methods), ``state.py`` (what they share, ``DataPlaneConfig``),
``uploads.py`` (puts, their coordination, cut-through forwards, spare copies),
``reads.py`` (reads and the hash check of local copies), ``catalog.py`` (stat, list,
delete), ``repair.py`` (the ``ReplicaManager`` driver: transfers, drops, tombstones, full
disk) and ``kv.py`` (quorum KV and hinted handoff)."""

from meshscale.runtime.data.plane import DataPlane
from meshscale.runtime.data.state import DataPlaneConfig

__all__ = ["DataPlane", "DataPlaneConfig"]
