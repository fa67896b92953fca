"""`TopologyBuilder`: build a cluster with controls and watch its figure change in place.

    from workbench.widgets import TopologyBuilder
    b = TopologyBuilder("aws-p5:nodes=2")
    b                      # the controls and the figure
    b.cluster              # the current Cluster
    b.yaml                 # its YAML (also shown in the text area); b.save("my.yaml")

Pick a preset, the number of nodes, and for all nodes or one (the "edit" selector) the GPU
model, GPUs per node, the link inside a node, the NIC model and NICs per GPU; the fabric kind,
switch and oversubscription; add or remove nodes. Every change is validated by the cluster
spec (an invalid choice shows the error and keeps the last good cluster) and the one
`FigureWidget` is updated inside `batch_update()`, never rebuilt.
"""

from __future__ import annotations

import html
from dataclasses import replace
from pathlib import Path
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from workbench.errors import WorkbenchError
from workbench.topology import Cluster, Fabric, Node, dump, dumps, from_dict, load_cluster, loads, preset
from workbench.topology import catalogue as cat
from workbench.topology.model import CPU_MODEL, FABRIC_KINDS, INTRA_KINDS
from workbench.topology.presets import preset_names
from workbench.topology.spec import to_dict
from workbench.viz.topology import topology_figure, update_in_place

ALL = "all nodes"
CUSTOM = "custom"


class TopologyBuilder:
    """Controls for a cluster plus its topology figure; `.cluster` is the current, valid cluster."""

    def __init__(self, cluster: str | Cluster = "aws-p5:nodes=2", max_nodes: int = 256) -> None:
        c = load_cluster(cluster)
        self._cluster = c
        self._nodes: list[Node] = list(c.nodes)
        self._fabric: Fabric = c.fabric
        self._name = c.name
        self._syncing = False
        base = str(cluster).partition(":")[0] if isinstance(cluster, str) else ""
        d = {"description_width": "130px"}
        self.preset = w.Dropdown(options=[CUSTOM, *preset_names()], value=base if base in preset_names() else CUSTOM,
                                 description="preset", style=d)
        self.nodes = w.BoundedIntText(value=len(self._nodes), min=1, max=max_nodes, description="nodes", style=d)
        self.target = w.Dropdown(options=[ALL], value=ALL, description="edit", style=d)
        self.gpu = w.Dropdown(options=[*cat.gpu_models(), CPU_MODEL], description="GPU model", style=d)
        self.gpus = w.BoundedIntText(min=1, max=64, description="GPUs per node", style=d)
        self.intra = w.Dropdown(options=list(INTRA_KINDS), description="inside a node", style=d)
        self.nic = w.Dropdown(options=list(cat.nic_models()), description="NIC model", style=d)
        self.nics_per_gpu = w.BoundedFloatText(min=0.0, max=8.0, step=0.125, description="NICs per GPU", style=d)
        self.fabric = w.Dropdown(options=list(FABRIC_KINDS), description="fabric", style=d)
        self.switch = w.Dropdown(options=cat.switch_kinds(), description="switch", style=d)
        self.oversubscription = w.BoundedFloatText(min=1.0, max=64.0, step=0.5, description="oversubscription",
                                                   style=d)
        self.add_node = w.Button(description="add node", icon="plus", tooltip="append a copy of the edited node")
        self.remove_node = w.Button(description="remove node", icon="minus",
                                    tooltip="remove the edited node (the last one when editing all)")
        self.yaml_text = w.Textarea(layout=w.Layout(width="100%", height="220px"), description="")
        self.apply_yaml = w.Button(description="load YAML", tooltip="build the cluster from the text above")
        self.save_path = w.Text(value="cluster.yaml", description="file", style=d)
        self.save_button = w.Button(description="save YAML", icon="save")
        self.status = w.HTML()
        self.figure = go.FigureWidget(topology_figure(c))
        self._sync_controls()
        self._sync_text()

        self.preset.observe(self._on_preset, "value")
        self.nodes.observe(self._on_nodes, "value")
        self.target.observe(lambda _: self._sync_controls(), "value")
        for ctl in (self.gpu, self.gpus, self.intra, self.nic, self.nics_per_gpu):
            ctl.observe(self._on_node_field, "value")
        for ctl in (self.fabric, self.switch, self.oversubscription):
            ctl.observe(self._on_fabric, "value")
        self.add_node.on_click(lambda _: self._add())
        self.remove_node.on_click(lambda _: self._remove())
        self.apply_yaml.on_click(lambda _: self.load_yaml(self.yaml_text.value))
        self.save_button.on_click(lambda _: self._save_clicked())

        self.widget = w.VBox([
            w.HBox([
                w.VBox([self.preset, self.nodes, w.HBox([self.add_node, self.remove_node]),
                        self.fabric, self.switch, self.oversubscription]),
                w.VBox([self.target, self.gpu, self.gpus, self.intra, self.nic, self.nics_per_gpu]),
            ]),
            self.status,
            self.figure,
            w.Accordion(children=[w.VBox([self.yaml_text, w.HBox([self.apply_yaml, self.save_path,
                                                                  self.save_button])])],
                        titles=("YAML",)),
        ])

    # ----- public API -----
    @property
    def cluster(self) -> Cluster:
        """The current cluster (the last valid one)."""
        return self._cluster

    @property
    def yaml(self) -> str:
        return dumps(self._cluster, "yaml")

    def save(self, path: str | Path) -> Path:
        """Write the current cluster to a YAML (or `.json`) file."""
        return dump(self._cluster, path)

    def load_yaml(self, text: str) -> None:
        """Replace the cluster by one read from YAML/JSON text (errors shown in `status`)."""
        try:
            c = loads(text)
        except WorkbenchError as exc:
            self._error(exc)
            return
        self._set_cluster(c, CUSTOM)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    # ----- handlers -----
    def _on_preset(self, change: dict[str, Any]) -> None:
        if self._syncing or change["new"] == CUSTOM:
            return
        try:
            c = preset(change["new"], nodes=self.nodes.value)
        except WorkbenchError as exc:
            self._error(exc)
            return
        self._set_cluster(c, change["new"])

    def _on_nodes(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        n = int(change["new"])
        nodes = self._nodes[:n] + [self._nodes[-1]] * max(0, n - len(self._nodes))
        self._apply(nodes, self._fabric)

    def _targets(self) -> list[int]:
        if self.target.value == ALL:
            return list(range(len(self._nodes)))
        return [int(str(self.target.value)[1:])]

    def _on_node_field(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        nodes = list(self._nodes)
        for i in self._targets():
            nodes[i] = self._edited(nodes[i], change["owner"])
        self._apply(nodes, self._fabric)

    def _edited(self, n: Node, owner: Any) -> Node:
        if owner is self.gpu:
            gpu = str(self.gpu.value)
            intra = n.intra
            if gpu == CPU_MODEL or cat.gpu(gpu).nvlink_gen is None:
                intra = "pcie"  # the only choice without NVLink
            return replace(n, gpu=gpu, intra=intra, specs=n.specs if gpu == CPU_MODEL else ())
        if owner is self.gpus:
            return replace(n, gpus=int(self.gpus.value), nics=self._nic_count(int(self.gpus.value), n))
        if owner is self.intra:
            return replace(n, intra=str(self.intra.value))
        if owner is self.nic:
            return replace(n, nic=str(self.nic.value))
        return replace(n, nics=self._nic_count(n.gpus, n))

    def _nic_count(self, gpus: int, n: Node) -> int:
        count = round(gpus * float(self.nics_per_gpu.value))
        return max(count, 1 if len(self._nodes) > 1 or n.nics else 0)

    def _on_fabric(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        fabric = replace(self._fabric, kind=str(self.fabric.value), switch=str(self.switch.value),
                         oversubscription=float(self.oversubscription.value))
        self._apply(self._nodes, fabric)

    def _add(self) -> None:
        i = self._targets()[-1]
        self._apply([*self._nodes, self._nodes[i]], self._fabric)

    def _remove(self) -> None:
        if len(self._nodes) <= 1:
            self._error(WorkbenchError("nodes: a cluster needs at least one node"))
            return
        i = self._targets()[-1]
        self._apply(self._nodes[:i] + self._nodes[i + 1:], self._fabric)

    def _save_clicked(self) -> None:
        try:
            path = self.save(self.save_path.value)
        except OSError as exc:
            self._error(exc)
            return
        self.status.value = f"<span style='color:#1e8449'>saved {html.escape(str(path))}</span>"

    # ----- state -----
    def _apply(self, nodes: list[Node], fabric: Fabric) -> None:
        """Validate through the spec (so the builder obeys the file format's rules) and redraw."""
        name = self._name if self._name.endswith("(edited)") else f"{self._name} (edited)"
        raw = {"name": name, "nodes": to_dict(Cluster(name, tuple(nodes), fabric))["nodes"],
               "fabric": to_dict(Cluster(name, tuple(nodes), fabric))["fabric"]}
        try:
            c = from_dict(raw)
            c.graph  # noqa: B018 - building the graph runs the remaining checks
        except WorkbenchError as exc:
            self._error(exc)
            self._sync_controls()  # show the last good values again
            return
        self._set_cluster(c, CUSTOM)

    def _set_cluster(self, c: Cluster, preset_value: str) -> None:
        self._cluster = c
        self._nodes = list(c.nodes)
        self._fabric = c.fabric
        self._name = c.name
        self.status.value = ""
        self._syncing = True
        try:
            self.preset.value = preset_value
        finally:
            self._syncing = False
        self._sync_controls()
        self._sync_text()
        update_in_place(self.figure, topology_figure(c))

    def _sync_controls(self) -> None:
        self._syncing = True
        try:
            self.nodes.value = len(self._nodes)
            options = [ALL, *(f"n{i}" for i in range(len(self._nodes)))]
            keep = self.target.value if self.target.value in options else ALL
            self.target.options = options
            self.target.value = keep
            n = self._nodes[self._targets()[0]]
            self.gpu.value = n.gpu
            self.gpus.value = n.gpus
            self.intra.value = n.intra
            self.nic.value = n.nic
            self.nics_per_gpu.value = n.nics / n.gpus
            self.fabric.value = self._fabric.kind
            self.switch.value = self._fabric.switch
            self.oversubscription.value = self._fabric.oversubscription
        finally:
            self._syncing = False

    def _sync_text(self) -> None:
        self.yaml_text.value = self.yaml

    def _error(self, exc: Exception) -> None:
        self.status.value = f"<span style='color:#c0392b'>error: {html.escape(str(exc))}</span>"
