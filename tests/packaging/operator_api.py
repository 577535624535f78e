"""What the operator does to the API server, derived from the code, so that
the chart's ClusterRole can be checked against it (tests/packaging) and
proven on a real API server (tests/integration/test_helm.py).

Three sources:
* Kopf's registry, after importing gpucluster.handlers: every resource a
  handler or an index serves is listed and watched; Kopf patches the
  resources of change handlers and timers (its finalizer and its progress
  annotations).
* The kubernetes client calls in gpucluster/handlers and gpucluster/kube,
  found by name and translated by CLIENT_CALLS (a list call in a file that
  watches, `watch=True`, also needs watch). A call the table does not
  know fails the test that uses it: teach the table, then the chart.
* What Kopf itself needs whatever the handlers are (events, CRD discovery,
  peering).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import NamedTuple

import kubernetes
import yaml

from .tools import REPO_ROOT


class Permission(NamedTuple):
    group: str  # "" for the core group
    resource: str  # with its subresource: "pods/eviction"
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}{'.' + self.group if self.group else ''}"


GROUP = "gpucluster.dev"
OPERATOR_SOURCES = [REPO_ROOT / "operator" / "gpucluster" / "handlers",
                    REPO_ROOT / "operator" / "gpucluster" / "kube"]
# Placeholders for the custom-object calls, whose plural is an argument:
# resolved to our cluster-scoped or namespaced CRDs.
CLUSTER_SCOPED, NAMESPACED = "<cluster-scoped>", "<namespaced>"

# kubernetes client method -> (group, resource, verb).
CLIENT_CALLS: dict[str, tuple[str, str, str]] = {
    "create_node": ("", "nodes", "create"),
    "delete_node": ("", "nodes", "delete"),
    "patch_node": ("", "nodes", "patch"),
    "patch_node_status": ("", "nodes/status", "patch"),
    "read_node": ("", "nodes", "get"),
    "list_node": ("", "nodes", "list"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod": ("", "pods", "get"),
    "create_namespaced_pod": ("", "pods", "create"),
    "delete_namespaced_pod": ("", "pods", "delete"),
    "delete_collection_namespaced_pod": ("", "pods", "deletecollection"),
    "patch_namespaced_pod": ("", "pods", "patch"),
    "patch_namespaced_pod_status": ("", "pods/status", "patch"),
    "create_namespaced_pod_eviction": ("", "pods/eviction", "create"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "create_namespaced_service": ("", "services", "create"),
    "read_namespaced_service": ("", "services", "get"),
    "delete_namespaced_service": ("", "services", "delete"),
    "create_namespaced_event": ("", "events", "create"),
    "read_priority_class": ("scheduling.k8s.io", "priorityclasses", "get"),
    "get_cluster_custom_object": (GROUP, CLUSTER_SCOPED, "get"),
    "list_cluster_custom_object": (GROUP, CLUSTER_SCOPED, "list"),
    "patch_cluster_custom_object": (GROUP, CLUSTER_SCOPED, "patch"),
    "patch_cluster_custom_object_status": (GROUP, f"{CLUSTER_SCOPED}/status", "patch"),
    "get_namespaced_custom_object": (GROUP, NAMESPACED, "get"),
    "list_namespaced_custom_object": (GROUP, NAMESPACED, "list"),
    "patch_namespaced_custom_object": (GROUP, NAMESPACED, "patch"),
    "patch_namespaced_custom_object_status": (GROUP, f"{NAMESPACED}/status", "patch"),
}

# Adapters whose custom-object calls address another project's API (the
# table above would read them as our group's): what each may do there. A
# custom-object call such a file makes that is not listed fails the test.
KARPENTER = "karpenter.sh"
FOREIGN_SOURCES: dict[str, tuple[dict[str, str], set[Permission]]] = {
    "operator/gpucluster/kube/karpenter.py": (
        {"get_cluster_custom_object": "get", "list_cluster_custom_object": "list",
         "patch_cluster_custom_object": "patch", "delete_cluster_custom_object": "delete"},
        {Permission(KARPENTER, "nodepools", "get"), Permission(KARPENTER, "nodepools", "list"),
         Permission(KARPENTER, "nodepools", "patch"), Permission(KARPENTER, "nodepools", "delete"),
         Permission(KARPENTER, "nodeclaims", "list"), Permission(KARPENTER, "nodeclaims", "delete")}),
}

# Kopf's own needs (kopf.readthedocs.io, "Deployment: RBAC").
KOPF_ALWAYS = {
    Permission("", "events", "create"),  # kopf.info/warn and handler outcomes
    Permission("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    Permission("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
KOPF_CLUSTER_PEERING = {Permission("kopf.dev", "clusterkopfpeerings", verb)
                        for verb in ("get", "list", "watch", "patch")}

# What the node agent (one node, `gpucluster agent`) and the fake device
# plugin with --watch-faults do: agent/nodestatus.py and agent/cli.py. The
# agent's annotations go in with its condition, in its patch of nodes/status.
AGENT = {Permission("", "nodes", "get"), Permission("", "nodes/status", "patch")}
DEVICE_PLUGIN_WATCHING_FAULTS = {Permission("", "nodes", "get")}

# Asked of the operator's ServiceAccount on a real cluster: it must not have them.
# It deletes a gang's pods by name; a delete of a whole collection by label
# could take pods it never made.
MUST_NOT = [
    ("get", "secrets", ""), ("list", "secrets", ""), ("create", "pods/exec", ""),
    ("get", "nodes/proxy", ""), ("*", "*", ""), ("delete", "trainingclusters", GROUP),
    ("create", "deployments", "apps"), ("update", "clusterroles", "rbac.authorization.k8s.io"),
    ("deletecollection", "pods", ""),
]


def crd_plurals() -> dict[str, list[str]]:
    """Our CRDs' plurals by scope, from crds/."""
    by_scope: dict[str, list[str]] = {CLUSTER_SCOPED: [], NAMESPACED: []}
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["group"] != GROUP:
            continue
        scope = CLUSTER_SCOPED if crd["spec"]["scope"] == "Cluster" else NAMESPACED
        by_scope[scope].append(crd["spec"]["names"]["plural"])
    return by_scope


@functools.cache
def _client_method_names() -> set[str]:
    names: set[str] = set()
    for attr in dir(kubernetes.client):
        if attr.endswith("Api"):
            names.update(n for n in dir(getattr(kubernetes.client, attr)) if not n.startswith("_"))
    return names


def _calls_in(path: Path) -> set[str]:
    """The kubernetes client methods one file calls."""
    known = _client_method_names()
    return {name for name in set(re.findall(r"\.([a-z_]+)\b", path.read_text()))
            if name in known and re.match(r"(create|delete|patch|read|list|replace|get|watch|connect)_", name)}


def client_calls(sources: list[Path] = OPERATOR_SOURCES) -> dict[str, list[str]]:
    """{kubernetes client method: [files calling it]} in the sources, but
    those of FOREIGN_SOURCES."""
    found: dict[str, list[str]] = {}
    for folder in sources:
        for path in sorted(folder.rglob("*.py")):
            if str(path.relative_to(REPO_ROOT)) in FOREIGN_SOURCES:
                continue
            for name in _calls_in(path):
                found.setdefault(name, []).append(str(path.relative_to(REPO_ROOT)))
    return found


class UnknownClientCall(AssertionError):
    pass


def _expand(group: str, resource: str, verb: str) -> set[Permission]:
    plurals = crd_plurals()
    for scope, names in plurals.items():
        if resource.startswith(scope):
            return {Permission(group, resource.replace(scope, plural), verb) for plural in names}
    return {Permission(group, resource, verb)}


def kopf_permissions() -> set[Permission]:
    import kopf
    from gpucluster import handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    needs: set[Permission] = set()
    for kind, patches in (("_indexing", False), ("_watching", False), ("_changing", True),
                          ("_spawning", True)):
        for handler in getattr(registry, kind).get_all_handlers():
            selector = handler.selector
            group = selector.group or ""
            plural = selector.plural or selector.any_name
            verbs = ["list", "watch", "patch"] if patches else ["list", "watch"]
            needs |= {Permission(group, plural, verb) for verb in verbs}
    return needs


def operator_permissions(peering: bool = True) -> set[Permission]:
    """Everything the operator's ServiceAccount must be allowed, cluster-wide
    (the chart's default: no watchNamespaces)."""
    calls = client_calls()
    unknown = sorted(set(calls) - set(CLIENT_CALLS))
    if unknown:
        raise UnknownClientCall(
            "kubernetes client calls tests/packaging/operator_api.py cannot translate into RBAC: "
            + ", ".join(f"{name} ({', '.join(calls[name])})" for name in unknown)
            + ". Add them to CLIENT_CALLS, and the verbs to helm/gpucluster/templates/rbac-operator.yaml.")
    needs = set(KOPF_ALWAYS) | kopf_permissions()
    for name in calls:
        needs |= _expand(*CLIENT_CALLS[name])
    # A list call made with watch=True watches as well, and so does one
    # handed to kube/watch.py's ListWatcher (the node and pod indexes, the
    # fleet agent's node watch), which makes it both ways.
    for path in (p for folder in OPERATOR_SOURCES for p in folder.rglob("*.py")):
        text = path.read_text()
        watched = set(re.findall(r"ListWatcher\(\w+\.(list_\w+)\b", text))
        if "watch=True" in text:
            watched |= set(re.findall(r"\.(list_\w+)\(", text))
        for name in watched & set(CLIENT_CALLS):
            needs |= {p._replace(verb="watch") for p in _expand(*CLIENT_CALLS[name])}
    for source, (verbs, permissions) in FOREIGN_SOURCES.items():
        used = _calls_in(REPO_ROOT / source)
        unknown = sorted(used - set(verbs))
        if unknown:
            raise UnknownClientCall(f"{source} calls {', '.join(unknown)}: add them to FOREIGN_SOURCES in "
                                    "tests/packaging/operator_api.py, and the verbs to the chart")
        assert {verbs[m] for m in used} == {p.verb for p in permissions}, f"{source}: verbs and calls differ"
        needs |= permissions
    # Pods and Services a job owns name it with blockOwnerDeletion: where the
    # OwnerReferencesPermissionEnforcement admission plugin is on, that needs
    # update on the owner's finalizers.
    kube_sources = "".join(p.read_text() for folder in OPERATOR_SOURCES for p in folder.rglob("*.py"))
    if '"blockOwnerDeletion": True' in kube_sources:
        needs |= {Permission(GROUP, f"{plural}/finalizers", "update") for plural in crd_plurals()[NAMESPACED]}
    if peering:
        needs |= KOPF_CLUSTER_PEERING
    return needs


def permissions_of(role: dict[str, object]) -> set[Permission]:
    """A ClusterRole's rules, one Permission per group x resource x verb."""
    granted: set[Permission] = set()
    for rule in role.get("rules", []):  # type: ignore[attr-defined]
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    granted.add(Permission(group, resource, verb))
    return granted
