"""Cluster topologies: hardware catalogue access, presets, YAML/JSON, discovery and path queries."""

from workbench.topology.catalogue import GPUSpec, NICSpec, gpu_models, nic_models
from workbench.topology.discover import discover
from workbench.topology.model import Cluster, Fabric, Graph, Link, Node, Path, Vertex
from workbench.topology.presets import load_cluster, preset, preset_names
from workbench.topology.spec import dump, dumps, from_dict, load, loads, to_dict

__all__ = [
    "Cluster", "Fabric", "GPUSpec", "Graph", "Link", "NICSpec", "Node", "Path", "Vertex",
    "discover", "dump", "dumps", "from_dict", "gpu_models", "load", "load_cluster", "loads",
    "nic_models", "preset", "preset_names", "to_dict",
]
