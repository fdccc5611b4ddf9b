#!/usr/bin/env python3
"""Structure tests of terraform/gcp and terraform/azure (a step of deploy/tests/validate.sh).

The google and azurerm providers cannot be downloaded where Ember is tested, so `terraform
validate` and `plan` cannot run for these two configurations. Instead this parses their HCL
(`hcl2`, from bc-python-hcl2, the parser checkov itself uses and pins) and the kustomize overlays
(YAML) and asserts the security properties the deployment promises: private by default, least
privilege, no keys or secrets, and the pieces the fleet depends on (ordering, dead letters,
routes). Each property is one test case.

Every test also runs against a *mutant*: an in-memory copy of the configuration with exactly that
property broken (a bucket made public, a key added, a role widened...). The mutant must make the
test fail; a test that passes its mutant proves nothing and is reported as FAILED
(`negative::<name>`). So the negative checks run on every CI run, not once by hand.

Run: python3 deploy/tests/test_cloud_structure.py [--root DIR]. The output ends with a cargo-style
`test result:` line that scripts/test.sh counts.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import re
import sys
import traceback
from typing import Any, Callable

try:
    import hcl2
    import yaml
except ImportError as exc:  # the deploy venv (scripts/install-deps.sh) has both
    print(f"test_cloud_structure: {exc}: run bash scripts/install-deps.sh (deploy venv)", file=sys.stderr)
    print("test result: FAILED. 0 passed; 1 failed; 0 ignored")
    sys.exit(1)


# --- the model ------------------------------------------------------------------------------

class Config:
    """One Terraform configuration directory, parsed: resources[type][name] = body, plus
    variables, outputs, the raw text (for searches that must also see comments' absence of
    keys) and the kustomize overlay of the same cloud."""

    def __init__(self, tf_dir: pathlib.Path, overlay_dir: pathlib.Path):
        self.resources: dict[str, dict[str, dict]] = {}
        self.variables: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.locals: dict[str, Any] = {}
        self.text = ""
        files = sorted(tf_dir.glob("*.tf"))
        if not files:
            raise SystemExit(f"test_cloud_structure: no .tf files in {tf_dir}")
        for f in files:
            src = f.read_text()
            self.text += src
            parsed = hcl2.loads(src)
            for block in parsed.get("resource", []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        self.resources.setdefault(rtype, {})[name] = body
            for block in parsed.get("variable", []):
                self.variables.update(block)
            for block in parsed.get("output", []):
                self.outputs.update(block)
            for block in parsed.get("locals", []):
                self.locals.update({k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in block.items()})
        # Templates the configuration renders (agent profile, kustomization).
        for f in sorted((tf_dir / "templates").glob("*")):
            self.text += f.read_text()
        self.k8s: list[dict] = []
        for f in sorted(overlay_dir.glob("*.yaml")):
            self.k8s += [d for d in yaml.safe_load_all(f.read_text()) if d]

    def of(self, rtype: str) -> dict[str, dict]:
        return self.resources.get(rtype, {})

    def all_resources(self):
        for rtype, named in self.resources.items():
            for name, body in named.items():
                yield rtype, name, body


def val(body: dict, key: str, default: Any = None) -> Any:
    """An attribute's value (hcl2 wraps every attribute in a one-element list)."""
    v = body.get(key, [default])
    return v[0] if isinstance(v, list) and v else v


def block(body: dict, key: str) -> dict:
    """The first block of that name, or {}."""
    v = body.get(key)
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return v[0]
    return {}


def blocks(body: dict, key: str) -> list[dict]:
    v = body.get(key)
    return [b for b in v if isinstance(b, dict)] if isinstance(v, list) else []


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


# --- GCP --------------------------------------------------------------------------------------

FLEET_GSA = "google_service_account.fleet"
BRIDGE_GSA = "google_service_account.bridge"
PRIMITIVE = {"roles/owner", "roles/editor", "roles/viewer"}


def iam_grants(c: Config):
    """Every *_iam_member / *_iam_binding / *_iam_policy resource: (type, name, body)."""
    for rtype, name, body in c.all_resources():
        if re.search(r"_iam_(member|binding|policy)$", rtype):
            yield rtype, name, body


def gcp_buckets_not_public(c: Config) -> None:
    buckets = c.of("google_storage_bucket")
    check(list(buckets) == ["ember"] and val(buckets["ember"], "for_each") == "${local.buckets}",
          f"expected one google_storage_bucket over local.buckets, found {list(buckets)}")
    check(set(c.locals.get("buckets", {})) == {"models", "lake"}, "local.buckets: models and lake")
    for name, b in buckets.items():
        check(val(b, "public_access_prevention") == "enforced", f"bucket {name}: public_access_prevention must be 'enforced'")
        check(val(b, "uniform_bucket_level_access") is True, f"bucket {name}: uniform_bucket_level_access must be true")
    for rtype in ("google_storage_bucket_acl", "google_storage_default_object_acl", "google_storage_object_acl"):
        check(not c.of(rtype), f"{rtype} must not exist (uniform access: no ACLs)")
    for rtype, name, body in iam_grants(c):
        members = str(body.get("member", "")) + str(body.get("members", ""))
        check("allUsers" not in members and "allAuthenticatedUsers" not in members, f"{rtype}.{name} grants to the public")


def gcp_buckets_versioned_lifecycle(c: Config) -> None:
    for name, b in c.of("google_storage_bucket").items():
        check(val(block(b, "versioning"), "enabled") is True, f"bucket {name}: versioning must be enabled")
        check(blocks(b, "lifecycle_rule"), f"bucket {name}: needs lifecycle rules (bounded version history)")
        check(val(b, "force_destroy", False) is False, f"bucket {name}: force_destroy must be false (scripts/down.sh empties it on purpose)")
        enc = [d for d in blocks(b, "dynamic") if "encryption" in d]
        check(enc or block(b, "encryption"), f"bucket {name}: CMEK must be possible (encryption block, var.kms_key_name)")


def gcp_cloudsql_private_only(c: Config) -> None:
    insts = c.of("google_sql_database_instance")
    check(len(insts) == 1, f"expected one Cloud SQL instance, found {list(insts)}")
    for name, i in insts.items():
        ip = block(block(i, "settings"), "ip_configuration")
        check(val(ip, "ipv4_enabled") is False, f"{name}: ipv4_enabled must be false (no public IP)")
        check(str(val(ip, "private_network", "")).startswith("${google_compute_network."), f"{name}: private_network must be the VPC")
        check(not blocks(ip, "authorized_networks"), f"{name}: no authorized_networks")


def gcp_cloudsql_tls_backups(c: Config) -> None:
    for name, i in c.of("google_sql_database_instance").items():
        s = block(i, "settings")
        ip = block(s, "ip_configuration")
        check(val(ip, "ssl_mode") in ("ENCRYPTED_ONLY", "TRUSTED_CLIENT_CERTIFICATE_REQUIRED"), f"{name}: ssl_mode must require TLS")
        bk = block(s, "backup_configuration")
        check(val(bk, "enabled") is True, f"{name}: backups must be enabled")
        check(val(bk, "point_in_time_recovery_enabled") is True, f"{name}: point-in-time recovery must be enabled")
        check(val(i, "deletion_protection") == "${var.deletion_protection}", f"{name}: deletion_protection must follow var.deletion_protection")
        check(str(val(i, "database_version")).startswith("POSTGRES_15"), f"{name}: PostgreSQL 15")
        flags = {val(f, "name"): val(f, "value") for f in blocks(s, "database_flags")}
        check(flags.get("cloudsql.iam_authentication") == "on", f"{name}: the IAM authentication flag must be on")


def gcp_no_service_account_keys(c: Config) -> None:
    check(not c.of("google_service_account_key"), "google_service_account_key must not exist (Workload Identity only)")
    check("google_service_account_key" not in c.text.replace("no google_service_account_key", ""),
          "google_service_account_key is referenced")
    for rtype, name, body in c.all_resources():
        check("credentials" not in body, f"{rtype}.{name}: no inline credentials")


def gcp_workload_identity_bindings(c: Config) -> None:
    ksas = {d["metadata"]["name"]: d for d in c.k8s if d.get("kind") == "ServiceAccount"}
    check({"ember-fleet", "ember-bridge"} <= set(ksas), f"overlays/gcp must define the KSAs ember-fleet and ember-bridge, found {sorted(ksas)}")
    wi = [b for b in c.of("google_service_account_iam_member").values() if val(b, "role") == "roles/iam.workloadIdentityUser"]
    for ksa, doc in ksas.items():
        gsa = (doc["metadata"].get("annotations") or {}).get("iam.gke.io/gcp-service-account", "")
        check(gsa.endswith(".iam.gserviceaccount.com"), f"KSA {ksa}: needs the iam.gke.io/gcp-service-account annotation")
        key = ksa.removeprefix("ember-")
        check(c.locals.get("ksa", {}).get(key) == ksa, f"locals.ksa.{key} must be {ksa}")
        member = f"serviceAccount:${{local.wi_pool}}[${{var.namespace}}/${{local.ksa.{key}}}]"
        binding = [b for b in wi if val(b, "member") == member]
        check(binding, f"KSA {ksa}: no roles/iam.workloadIdentityUser binding for serviceAccount:<pool>[ns/{ksa}]")
        check(all(val(b, "service_account_id") == f"${{google_service_account.{key}.name}}" for b in binding),
              f"KSA {ksa}: its binding must be on the ember-{key} GSA")
    check("svc.id.goog" in str(c.locals.get("wi_pool")), "locals.wi_pool must be <project>.svc.id.goog")
    gke = next(iter(c.of("google_container_cluster").values()))
    check(val(block(gke, "workload_identity_config"), "workload_pool") == "${local.wi_pool}", "the cluster must enable Workload Identity")


def grants_of(c: Config, gsa: str) -> list[tuple[str, str, str, dict]]:
    """(resource type, role, the resource it is on, body) for every grant to that GSA."""
    out = []
    for rtype, name, body in iam_grants(c):
        member = str(body.get("member", "")) + str(body.get("members", ""))
        if f"{gsa}.email" in member:
            target = next((str(val(body, k)) for k in ("subscription", "topic", "bucket", "project", "service_account_id",
                                                        "repository", "table_id") if k in body), "")
            out.append((rtype, val(body, "role"), target, body))
    return out


def gcp_fleet_roles_minimal(c: Config) -> None:
    g = grants_of(c, FLEET_GSA)
    got = sorted((t, r, tgt) for t, r, tgt, _ in g)
    want = sorted([
        ("google_pubsub_subscription_iam_member", "roles/pubsub.subscriber", "${google_pubsub_subscription.fleet.id}"),
        ("google_pubsub_topic_iam_member", "roles/pubsub.publisher", "${google_pubsub_topic.dead_letter.id}"),
        ("google_storage_bucket_iam_member", "roles/storage.objectAdmin", "${each.value.name}"),
        ("google_project_iam_member", "roles/cloudsql.client", "${var.project_id}"),
    ])
    check(got == want, f"the fleet's grants must be exactly {want}, found {got}")
    for t, r, tgt, body in g:
        if t == "google_storage_bucket_iam_member":
            check(val(body, "for_each") == "${google_storage_bucket.ember}", "storage.objectAdmin must be on the two Ember buckets only")
        if t == "google_project_iam_member":
            cond = block(body, "condition")
            check("google_sql_database_instance.ember.name" in str(val(cond, "expression", "")),
                  "the project-level cloudsql.client grant must be conditioned on the Ember instance")


def gcp_bridge_roles_minimal(c: Config) -> None:
    got = sorted((t, r, tgt) for t, r, tgt, _ in grants_of(c, BRIDGE_GSA))
    want = [("google_pubsub_topic_iam_member", "roles/pubsub.publisher", "${google_pubsub_topic.ingest.id}")]
    check(got == want, f"the bridge's grants must be exactly {want}, found {got}")


def gcp_no_broad_roles(c: Config) -> None:
    for rtype, name, body in iam_grants(c):
        role = val(body, "role")
        check(role not in PRIMITIVE, f"{rtype}.{name}: primitive role {role}")
        check(not rtype.endswith(("_iam_binding", "_iam_policy")) or not rtype.startswith("google_project"),
              f"{rtype}.{name}: authoritative project IAM would remove others' grants")
        check(role not in ("roles/iam.serviceAccountUser", "roles/iam.serviceAccountTokenCreator", "roles/iam.serviceAccountKeyAdmin"),
              f"{rtype}.{name}: {role} allows impersonation or keys")
    node_roles = {"roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/monitoring.viewer", "roles/stackdriver.resourceMetadata.writer"}
    for name, body in c.of("google_project_iam_member").items():
        roles = set(re.findall(r"roles/[\w.]+", val(body, "for_each"))) if "for_each" in body else {val(body, "role")}
        check(roles <= node_roles | {"roles/cloudsql.client"}, f"google_project_iam_member.{name}: project-wide {roles - node_roles}")


def gcp_pubsub_ordering_dead_letter(c: Config) -> None:
    subs = c.of("google_pubsub_subscription")
    fleet = subs.get("fleet")
    check(fleet is not None, "the fleet subscription must exist")
    check(val(fleet, "enable_message_ordering") is True, "fleet subscription: enable_message_ordering must be true")
    dl = block(fleet, "dead_letter_policy")
    check(val(dl, "dead_letter_topic") == "${google_pubsub_topic.dead_letter.id}", "fleet subscription: dead-letter topic")
    check(val(dl, "max_delivery_attempts") is not None, "fleet subscription: max_delivery_attempts")
    check(val(fleet, "message_retention_duration") is not None, "fleet subscription: retention")
    check(val(fleet, "ack_deadline_seconds") is not None, "fleet subscription: ack deadline")
    check(val(fleet, "topic") == "${google_pubsub_topic.ingest.id}", "fleet subscription: on the ingest topic")
    check("dead_letter" in c.of("google_pubsub_topic") and "ingest" in c.of("google_pubsub_topic"), "topics ingest and dead_letter")
    agent = [b for b in c.of("google_pubsub_topic_iam_member").values()
             if val(b, "topic") == "${google_pubsub_topic.dead_letter.id}" and val(b, "member") == "${local.pubsub_agent}"]
    check(agent, "the Pub/Sub service agent must be allowed to publish to the dead-letter topic")


def gcp_bigquery_subscription(c: Config) -> None:
    bq = [b for b in c.of("google_pubsub_subscription").values() if block(b, "bigquery_config")]
    check(bq, "a Pub/Sub BigQuery subscription must exist")
    for b in bq:
        check("google_bigquery_table" in str(val(block(b, "bigquery_config"), "table")) or "each.value" in str(val(block(b, "bigquery_config"), "table")),
              "the BigQuery subscription must write to a table of this configuration")
    check(c.of("google_bigquery_dataset") and c.of("google_bigquery_table"), "dataset and tables")


def gcp_gke_private_hardened(c: Config) -> None:
    (name, gke), = c.of("google_container_cluster").items()
    check(val(block(gke, "private_cluster_config"), "enable_private_nodes") is True, "private nodes")
    check(blocks(gke, "master_authorized_networks_config"), "master authorized networks")
    check(val(gke, "enable_shielded_nodes") is True, "shielded nodes")
    check(val(gke, "datapath_provider") == "ADVANCED_DATAPATH" or val(block(gke, "network_policy"), "enabled") is True,
          "network policy enforcement (Dataplane V2 or network_policy)")
    check(val(gke, "enable_legacy_abac", False) is False, "no legacy ABAC")
    for pname, pool in c.of("google_container_node_pool").items():
        nc = block(pool, "node_config")
        check(val(block(nc, "workload_metadata_config"), "mode") == "GKE_METADATA", f"pool {pname}: GKE metadata server")
        check(val(block(nc, "shielded_instance_config"), "enable_secure_boot") is True, f"pool {pname}: secure boot")
        check(val(nc, "service_account") == "${google_service_account.nodes.email}", f"pool {pname}: the minimal node service account")


def gcp_outputs_profile(c: Config) -> None:
    for o in ("broker_endpoint", "agent_profile_file"):
        check(o in c.outputs, f"output {o}")
    check("local_file" in c.resources and "agent_profile" in c.of("local_file"), "the agent profile is written as a file")


# --- Azure ------------------------------------------------------------------------------------

BROAD_AZURE_ROLES = {"Owner", "Contributor", "User Access Administrator", "Role Based Access Control Administrator"}


def azure_storage_private(c: Config) -> None:
    (name, st), = c.of("azurerm_storage_account").items()
    check(val(st, "public_network_access_enabled") is False, "storage: public_network_access_enabled must be false")
    check(val(st, "allow_nested_items_to_be_public") is False, "storage: no anonymous blob access")
    check(val(block(st, "network_rules"), "default_action") == "Deny", "storage: network rules deny by default")
    check(val(st, "shared_access_key_enabled") is False, "storage: shared keys disabled (Entra ID only)")
    pe = [b for b in c.of("azurerm_private_endpoint").values()
          if val(block(b, "private_service_connection"), "private_connection_resource_id") == f"${{azurerm_storage_account.{name}.id}}"]
    check(pe, "storage: a private endpoint")
    for cname, cont in c.of("azurerm_storage_container").items():
        check(val(cont, "container_access_type", "private") == "private", f"container {cname}: private")


def azure_storage_tls_encryption(c: Config) -> None:
    (name, st), = c.of("azurerm_storage_account").items()
    check(val(st, "min_tls_version") == "TLS1_2", "storage: min_tls_version TLS1_2")
    check(val(st, "https_traffic_only_enabled", True) is True, "storage: HTTPS only")
    check(val(st, "infrastructure_encryption_enabled") is True, "storage: infrastructure encryption")
    check(val(block(st, "blob_properties"), "versioning_enabled") is True, "storage: versioning")


def azure_postgres_private(c: Config) -> None:
    (name, pg), = c.of("azurerm_postgresql_flexible_server").items()
    check(val(pg, "public_network_access_enabled") is False, "postgres: public network access off")
    check(val(pg, "delegated_subnet_id") and val(pg, "private_dns_zone_id"), "postgres: private access (delegated subnet + private DNS zone)")
    check(not c.of("azurerm_postgresql_flexible_server_firewall_rule"), "postgres: no firewall rules (no public access)")
    check(str(val(pg, "version")) == "15", "postgres: version 15")


def azure_postgres_tls_auth(c: Config) -> None:
    (name, pg), = c.of("azurerm_postgresql_flexible_server").items()
    auth = block(pg, "authentication")
    check(val(auth, "password_auth_enabled") is False and val(auth, "active_directory_auth_enabled") is True,
          "postgres: Entra ID authentication only")
    check("administrator_password" not in pg, "postgres: no administrator password (it would be in the state)")
    cfg = next(iter(c.of("azurerm_postgresql_flexible_server_configuration").values()), {})
    settings = val(cfg, "for_each", {}) or {}
    check(settings.get("require_secure_transport") == "on", "postgres: require_secure_transport on")
    check(settings.get("ssl_min_protocol_version") in ("TLSv1.2", "TLSv1.3"), "postgres: TLS 1.2 minimum")


def azure_iothub_routes(c: Config) -> None:
    (name, hub), = c.of("azurerm_iothub").items()
    check(val(block(hub, "sku"), "name") == "${var.iothub_sku}" and val(c.variables["iothub_sku"], "default") == "S1",
          "IoT Hub: standard tier from var.iothub_sku, S1 by default (device twin, cloud-to-device)")
    check(str(val(hub, "min_tls_version")) == "1.2", "IoT Hub: min TLS 1.2")
    routes = {val(r, "source"): r for r in blocks(hub, "route")}
    for src in ("DeviceMessages", "DeviceConnectionStateEvents"):
        r = routes.get(src)
        check(r is not None, f"IoT Hub: a route for {src}")
        check(val(r, "endpoint_names") == ["events"] and val(r, "enabled") is True, f"IoT Hub: {src} routed to the built-in events endpoint")
    cg = [b for b in c.of("azurerm_iothub_consumer_group").values() if val(b, "eventhub_endpoint_name") == "events"]
    check(cg, "IoT Hub: a consumer group on the events endpoint for the fleet")
    check(c.of("azurerm_iothub_dps"), "the Device Provisioning Service")


def azure_managed_identity_no_secrets(c: Config) -> None:
    for rtype in ("azuread_application_password", "azuread_service_principal_password", "azuread_application_certificate",
                  "azurerm_iothub_shared_access_policy", "azurerm_iothub_dps_shared_access_policy"):
        check(not c.of(rtype), f"{rtype} must not exist (its secret would be in the state)")
    check(not re.search(r"client_secret|primary_key|primary_connection_string|administrator_password", c.text),
          "no client secret, key or connection string is referenced")
    for name, dps in c.of("azurerm_iothub_dps").items():
        check(not blocks(dps, "linked_hub"), f"DPS {name}: the hub link (a connection string) is made by scripts/up.sh, not in the state")
    (aname, aks), = c.of("azurerm_kubernetes_cluster").items()
    check(val(block(aks, "identity"), "type") in ("SystemAssigned", "UserAssigned"), "AKS: managed identity")
    check("service_principal" not in aks, "AKS: no service principal secret")
    check(val(aks, "oidc_issuer_enabled") is True and val(aks, "workload_identity_enabled") is True, "AKS: OIDC issuer and workload identity")
    (fname, fed), = c.of("azurerm_federated_identity_credential").items()
    check(val(fed, "subject") == "system:serviceaccount:${var.namespace}:${local.fleet_ksa}", "federated credential subject = the fleet's KSA")
    check(val(fed, "parent_id") == "${azurerm_user_assigned_identity.fleet.id}", "federated credential on the fleet identity")
    ksa = [d for d in c.k8s if d.get("kind") == "ServiceAccount" and d["metadata"]["name"] == c.locals.get("fleet_ksa")]
    check(ksa and "azure.workload.identity/client-id" in (ksa[0]["metadata"].get("annotations") or {}),
          "overlays/azure: the fleet KSA carries azure.workload.identity/client-id")


def azure_role_assignments_scoped(c: Config) -> None:
    ras = c.of("azurerm_role_assignment")
    check(ras, "role assignments exist")
    for name, ra in ras.items():
        scope = str(val(ra, "scope"))
        check(re.fullmatch(r"\$\{azurerm_[a-z_]+\.[a-z_]+\.id\}", scope) is not None, f"role assignment {name}: scope {scope} is not one resource")
        check(not re.search(r"subscription|resource_group", scope), f"role assignment {name}: scoped to a subscription or resource group")
        check(val(ra, "role_definition_name") not in BROAD_AZURE_ROLES, f"role assignment {name}: broad role {val(ra, 'role_definition_name')}")


def azure_fleet_roles_minimal(c: Config) -> None:
    got = sorted((val(ra, "role_definition_name"), val(ra, "scope")) for ra in c.of("azurerm_role_assignment").values()
                 if "azurerm_user_assigned_identity.fleet" in str(val(ra, "principal_id")))
    want = sorted([("Storage Blob Data Contributor", "${azurerm_storage_account.ember.id}"),
                   ("IoT Hub Twin Contributor", "${azurerm_iothub.ember.id}")])
    check(got == want, f"the fleet identity's roles must be exactly {want}, found {got}")


def azure_aks_network_rbac(c: Config) -> None:
    (name, aks), = c.of("azurerm_kubernetes_cluster").items()
    net = block(aks, "network_profile")
    check(val(net, "network_plugin") == "azure", "AKS: Azure CNI")
    check(val(net, "network_policy") in ("azure", "calico", "cilium"), "AKS: network policy")
    check(val(aks, "local_account_disabled") is True, "AKS: local accounts disabled")
    check(val(block(aks, "azure_active_directory_role_based_access_control"), "azure_rbac_enabled") is True, "AKS: Entra ID + Azure RBAC")
    check(val(aks, "private_cluster_enabled") is True or val(block(aks, "api_server_access_profile"), "authorized_ip_ranges"),
          "AKS: private cluster or authorized IP ranges")


def azure_outputs_profile(c: Config) -> None:
    check("iothub_hostname" in c.outputs and "agent_profile_file" in c.outputs, "outputs iothub_hostname and agent_profile_file")
    check("agent_profile" in c.of("local_file"), "the agent profile is written as a file")


def variables_documented(c: Config) -> None:
    for vname, v in c.variables.items():
        check(str(val(v, "description", "")).strip(), f"variable {vname}: needs a description")
        check(val(v, "type") is not None, f"variable {vname}: needs a type")


# --- mutants: each breaks exactly the property of one test ---------------------------------------

def _add(rtype: str, name: str, body: dict) -> Callable[[Config], None]:
    def m(c: Config) -> None:
        c.resources.setdefault(rtype, {})[name] = body
    return m


def _first(c: Config, rtype: str) -> dict:
    return next(iter(c.of(rtype).values()))


def _mut_routes(c: Config) -> None:
    hub = _first(c, "azurerm_iothub")
    hub["route"] = [r for r in hub["route"] if val(r, "source") != "DeviceConnectionStateEvents"]


def _mut_fleet_wider(c: Config) -> None:
    c.resources["google_project_iam_member"]["fleet_pubsub_admin"] = {
        "project": ["${var.project_id}"], "role": ["roles/pubsub.subscriber"],
        "member": ["serviceAccount:${google_service_account.fleet.email}"]}


def _mut_wi(c: Config) -> None:
    del c.resources["google_service_account_iam_member"]["bridge_workload_identity"]


def _mut_pg_cfg(c: Config) -> None:
    _first(c, "azurerm_postgresql_flexible_server_configuration")["for_each"][0]["require_secure_transport"] = "off"


def _mut_vars(c: Config) -> None:
    next(iter(c.variables.values()))["description"] = [""]


def _mut_gke(c: Config) -> None:
    _first(c, "google_container_cluster")["private_cluster_config"][0]["enable_private_nodes"] = [False]


TESTS: list[tuple[str, str, Callable[[Config], None], Callable[[Config], None], str]] = [
    # (cloud, name, test, mutant, what the failure must say: the mutant is caught for its reason)
    ("gcp", "buckets_not_public", gcp_buckets_not_public,
     lambda c: c.resources["google_storage_bucket"]["ember"].update(public_access_prevention=["inherited"]),
     "public_access_prevention"),
    ("gcp", "buckets_versioned_lifecycle", gcp_buckets_versioned_lifecycle,
     lambda c: _first(c, "google_storage_bucket")["versioning"][0].update(enabled=[False]), "versioning"),
    ("gcp", "cloudsql_private_only", gcp_cloudsql_private_only,
     lambda c: _first(c, "google_sql_database_instance")["settings"][0]["ip_configuration"][0].update(ipv4_enabled=[True]),
     "ipv4_enabled"),
    ("gcp", "cloudsql_tls_backups_pitr", gcp_cloudsql_tls_backups,
     lambda c: _first(c, "google_sql_database_instance")["settings"][0]["backup_configuration"][0].update(point_in_time_recovery_enabled=[False]),
     "point-in-time"),
    ("gcp", "no_service_account_keys", gcp_no_service_account_keys,
     _add("google_service_account_key", "fleet", {"service_account_id": ["${google_service_account.fleet.name}"]}),
     "google_service_account_key must not exist"),
    ("gcp", "workload_identity_bindings", gcp_workload_identity_bindings, _mut_wi, "KSA ember-bridge: no roles/iam.workloadIdentityUser"),
    ("gcp", "fleet_roles_minimal", gcp_fleet_roles_minimal, _mut_fleet_wider, "the fleet's grants must be exactly"),
    ("gcp", "bridge_roles_minimal", gcp_bridge_roles_minimal,
     lambda c: c.resources["google_pubsub_topic_iam_member"]["bridge_publisher"].update(role=["roles/pubsub.editor"]),
     "the bridge's grants must be exactly"),
    ("gcp", "no_broad_roles", gcp_no_broad_roles,
     _add("google_project_iam_member", "fleet_editor", {"project": ["${var.project_id}"], "role": ["roles/editor"],
                                                        "member": ["serviceAccount:${google_service_account.fleet.email}"]}),
     "primitive role roles/editor"),
    ("gcp", "pubsub_ordering_dead_letter", gcp_pubsub_ordering_dead_letter,
     lambda c: c.resources["google_pubsub_subscription"]["fleet"].update(enable_message_ordering=[False]), "enable_message_ordering"),
    ("gcp", "bigquery_subscription", gcp_bigquery_subscription,
     lambda c: [b.pop("bigquery_config", None) for b in c.of("google_pubsub_subscription").values()], "BigQuery subscription must exist"),
    ("gcp", "gke_private_hardened", gcp_gke_private_hardened, _mut_gke, "private nodes"),
    ("gcp", "outputs_agent_profile", gcp_outputs_profile, lambda c: c.outputs.pop("agent_profile_file"), "output agent_profile_file"),
    ("gcp", "variables_documented", variables_documented, _mut_vars, "needs a description"),
    ("azure", "storage_private", azure_storage_private,
     lambda c: _first(c, "azurerm_storage_account").update(public_network_access_enabled=[True]), "public_network_access_enabled"),
    ("azure", "storage_tls_encryption_versioning", azure_storage_tls_encryption,
     lambda c: _first(c, "azurerm_storage_account").update(min_tls_version=["TLS1_0"]), "TLS1_2"),
    ("azure", "postgres_private", azure_postgres_private,
     lambda c: _first(c, "azurerm_postgresql_flexible_server").update(public_network_access_enabled=[True]), "public network access off"),
    ("azure", "postgres_tls_entra_only", azure_postgres_tls_auth, _mut_pg_cfg, "require_secure_transport"),
    ("azure", "iothub_routes", azure_iothub_routes, _mut_routes, "DeviceConnectionStateEvents"),
    ("azure", "managed_identity_no_secrets", azure_managed_identity_no_secrets,
     _add("azurerm_iothub_shared_access_policy", "fleet", {"name": ["fleet"], "service_connect": [True]}),
     "azurerm_iothub_shared_access_policy must not exist"),
    ("azure", "role_assignments_scoped", azure_role_assignments_scoped,
     lambda c: _first(c, "azurerm_role_assignment").update(scope=["/subscriptions/${var.subscription_id}"]), "is not one resource"),
    ("azure", "fleet_roles_minimal", azure_fleet_roles_minimal,
     _add("azurerm_role_assignment", "fleet_hub_data", {"scope": ["${azurerm_iothub.ember.id}"], "role_definition_name": ["IoT Hub Data Contributor"],
                                                        "principal_id": ["${azurerm_user_assigned_identity.fleet.principal_id}"]}),
     "the fleet identity's roles must be exactly"),
    ("azure", "aks_network_rbac", azure_aks_network_rbac,
     lambda c: _first(c, "azurerm_kubernetes_cluster").update(local_account_disabled=[False]), "local accounts disabled"),
    ("azure", "outputs_agent_profile", azure_outputs_profile, lambda c: c.outputs.pop("iothub_hostname"), "iothub_hostname"),
    ("azure", "variables_documented", variables_documented, _mut_vars, "needs a description"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[2]), help="the repository root")
    ap.add_argument("--no-negative", action="store_true", help="skip the mutants (debugging only)")
    args = ap.parse_args()
    root = pathlib.Path(args.root)
    configs = {cloud: Config(root / "terraform" / cloud, root / "deploy/k8s/overlays" / cloud) for cloud in ("gcp", "azure")}
    passed = failed = 0
    failures = []
    for cloud, name, test, mutant, expect in TESTS:
        full = f"cloud_structure::{cloud}::{name}"
        try:
            test(configs[cloud])
            print(f"test {full} ... ok")
            passed += 1
        except Exception as exc:  # noqa: BLE001 - any error is a failed test, reported
            print(f"test {full} ... FAILED\n    {exc if isinstance(exc, AssertionError) else traceback.format_exc()}")
            failed += 1
            failures.append(full)
        if args.no_negative:
            continue
        neg = f"cloud_structure::{cloud}::negative::{name}"
        broken = copy.deepcopy(configs[cloud])
        try:
            mutant(broken)
            test(broken)
        except AssertionError as exc:
            if expect in str(exc):
                print(f"test {neg} ... ok (caught: {exc})")
                passed += 1
            else:
                print(f"test {neg} ... FAILED\n    caught for another reason than {expect!r}: {exc}")
                failed += 1
                failures.append(neg)
            continue
        except Exception:  # noqa: BLE001
            print(f"test {neg} ... FAILED\n    the mutant raised instead of failing an assertion:\n{traceback.format_exc()}")
            failed += 1
            failures.append(neg)
            continue
        print(f"test {neg} ... FAILED\n    the test passed with its property broken")
        failed += 1
        failures.append(neg)
    if failures:
        print("failures:\n    " + "\n    ".join(failures))
        print(f"test result: FAILED. {passed} passed; {failed} failed; 0 ignored")
        return 1
    print(f"test result: ok. {passed} passed; 0 failed; 0 ignored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
