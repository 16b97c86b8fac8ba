"""``deploy/terraform`` against the code it deploys, parsed with python-hcl2 (no
Terraform binary or cloud is reachable here): the topology comes from the registry's
rendered file and every field of it is applied, the dead-letter IAM is there, the
Scheduler bodies are valid maintenance requests, every environment variable is one the
worker reads, every secret referenced exists, every variable is declared, documented
and used, and the connection budget holds."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2 import SerializationOptions

from schemas.maintenance import MaintenanceRequest
from worker.config import Settings
from worker.pubsub.invalidations import INVALIDATION_TOPIC

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "deploy" / "terraform"
TOPOLOGY = json.loads((ROOT / "deploy" / "pubsub-topology.json").read_text())
# python-hcl2 8's default keeps HCL's quotes on strings; this is its plain shape.
PLAIN = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)

# Read by the OpenTelemetry SDK (README: Telemetry), not by Settings.
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"}
# Read by the command line (worker/cli/main.py, worker/supervisor.py), not by Settings.
CLI_VARIABLES = {"LOG_LEVEL", "WORKER_PROCESSES"}


@dataclass
class Module:
    resources: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # module blocks
    text: str = ""


def load(path: Path) -> dict[str, Any]:
    with path.open() as fp:
        parsed: dict[str, Any] = hcl2.load(fp, serialization_options=PLAIN)
    return parsed


@cache
def module(folder: Path = TERRAFORM) -> Module:
    found = Module()
    for path in sorted(folder.glob("*.tf")):
        parsed = load(path)
        found.text += path.read_text()
        for block in parsed.get("module", []):
            found.calls.update(block)
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                for name, body in named.items():
                    found.resources[(kind, name)] = body
        for block in parsed.get("variable", []):
            found.variables.update(block)
        for block in parsed.get("locals", []):
            found.locals.update(block)
        for block in parsed.get("output", []):
            found.outputs.update(block)
    return found


def resource(kind: str, name: str) -> dict[str, Any]:
    return module().resources[(kind, name)]


def paths(entry: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every leaf of a JSON object as a dotted path."""
    for key, value in entry.items():
        if isinstance(value, Mapping):
            yield from paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def worker_subscriptions() -> list[dict[str, Any]]:
    return [s for s in TOPOLOGY["subscriptions"] if "dead_letter_policy" in s]


def dead_letter_subscriptions() -> list[dict[str, Any]]:
    return [s for s in TOPOLOGY["subscriptions"] if "dead_letter_policy" not in s]


# -- the topology ---------------------------------------------------------------------


def test_the_topology_is_the_rendered_file_not_a_second_list() -> None:
    assert module().locals["topology"] == (
        '${jsondecode(file("${path.module}/../pubsub-topology.json"))}'
    )
    assert resource("google_pubsub_topic", "topics")["for_each"] == (
        "${toset(local.topology.topics)}"
    )
    # No topic or subscription is named anywhere else.
    for entry in TOPOLOGY["subscriptions"]:
        assert f'"{entry["name"]}"' not in module().text, entry["name"]
    invalidation = module().variables["invalidation_topic"]["default"]
    assert invalidation == INVALIDATION_TOPIC and invalidation in TOPOLOGY["topics"]


def test_readiness_may_ask_pubsub_for_the_topic_it_checks() -> None:
    # /readyz sends GetTopic for INVALIDATION_TOPIC: publisher alone does not allow it.
    grant = resource("google_pubsub_topic_iam_member", "runtime_checks_readiness")
    assert grant["topic"] == "${google_pubsub_topic.topics[var.invalidation_topic].id}"
    assert grant["role"] == "roles/pubsub.viewer"
    assert grant["for_each"] == '${toset(["serve", "worker"])}'


@pytest.mark.parametrize(
    ("name", "entries"),
    [("worker", worker_subscriptions()), ("dead_letter", dead_letter_subscriptions())],
)
def test_every_field_of_the_topology_is_applied(name: str, entries: list[dict[str, Any]]) -> None:
    assert entries
    body = json.dumps(resource("google_pubsub_subscription", name))
    assert resource("google_pubsub_subscription", name)["name"] == "${each.key}"
    for entry in entries:
        for path in paths(entry):
            if path == "name":
                continue
            # A field of the file the resource does not read would silently not apply.
            assert f"each.value.{path}" in body, f"{name} subscriptions ignore {path}"
    # Each worker subscription, and only those, has a dead-letter policy.
    split = module().locals[f"{name}_subscriptions"]
    assert 'lookup(s, "dead_letter_policy", null)' in split


def test_push_mode_pushes_each_topic_to_its_route_with_an_oidc_token() -> None:
    [dynamic] = resource("google_pubsub_subscription", "worker")["dynamic"]
    push = dynamic["push_config"]
    assert push["for_each"] == "${local.push ? [each.value.topic] : []}"
    [content] = push["content"]
    assert content["push_endpoint"] == ("${module.serve.uri}/push/${push_config.value}")
    [token] = content["oidc_token"]
    assert token["audience"] == "${local.push_audience}"
    # serve checks that audience and that identity (PUSH_AUDIENCE, PUSH_SERVICE_ACCOUNTS)
    env = module_env("serve")
    assert env["PUSH_AUDIENCE"] == "local.push_audience"
    assert env["PUSH_SERVICE_ACCOUNTS"] == "google_service_account.push.email"
    assert token["service_account_email"] == "${google_service_account.push.email}"
    assert module().calls["serve"]["custom_audiences"] == ["${local.push_audience}"]


def test_pubsub_s_service_agent_may_forward_dead_letters() -> None:
    agent = (
        "serviceAccount:service-${data.google_project.this.number}"
        "@gcp-sa-pubsub.iam.gserviceaccount.com"
    )
    assert module().locals["pubsub_sa"] == agent
    publishes = resource("google_pubsub_topic_iam_member", "agent_publishes_dead_letters")
    assert publishes["for_each"] == "${local.dead_letter_topics}"
    assert (publishes["role"], publishes["member"]) == (
        "roles/pubsub.publisher",
        "${local.pubsub_sa}",
    )
    acknowledges = resource("google_pubsub_subscription_iam_member", "agent_acknowledges_sources")
    assert acknowledges["for_each"] == "${google_pubsub_subscription.worker}"
    assert (acknowledges["role"], acknowledges["member"]) == (
        "roles/pubsub.subscriber",
        "${local.pubsub_sa}",
    )
    assert "s.dead_letter_policy.dead_letter_topic" in module().locals["dead_letter_topics"]


# -- what the services are given --------------------------------------------------------


def test_scheduler_bodies_are_valid_maintenance_requests() -> None:
    tasks = module().locals["maintenance_tasks"]
    assert set(tasks) == {"backup", "retention"}
    for task, spec in tasks.items():
        request = MaintenanceRequest.model_validate(spec["body"])
        assert request.task == task
    job = resource("google_cloud_scheduler_job", "maintenance")
    [target] = job["pubsub_target"]
    assert target["topic_name"] == '${google_pubsub_topic.topics["maintenance"].id}'
    assert target["data"] == "${base64encode(jsonencode(each.value.body))}"
    assert job["time_zone"] == "Etc/UTC"
    assert "maintenance" in TOPOLOGY["topics"]


class Recording(dict[str, str]):
    """An empty environment that remembers every variable asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return default

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return False


def settings_variables() -> set[str]:
    environment = Recording()
    Settings.from_env(environment)
    return environment.asked


NAMED = re.compile(r"\b([A-Z][A-Z0-9_]+)\s*=\s*([^\n,}]+)")
SERVICE = TERRAFORM / "service"


def module_env(service: str) -> dict[str, str]:
    """The environment variables ``service`` is given: name -> value expression (the
    inline ones and those of the ``*_env`` locals it merges)."""
    call = module().calls[service]
    found: dict[str, str] = {}
    for argument in ("env", "secret_env"):
        source = call[argument]
        for local in re.findall(r"local\.(\w+_env)", source):
            value = module().locals[local]
            if isinstance(value, dict):
                found.update({k: str(v) for k, v in value.items()})
            else:
                found.update({k: v.strip() for k, v in NAMED.findall(value.replace('"', ""))})
        found.update({k: v.strip() for k, v in NAMED.findall(source)})
    return found


def test_the_service_module_gives_its_container_every_variable_and_secret() -> None:
    service = module(SERVICE).resources[("google_cloud_run_v2_service", "this")]
    [container] = service["template"][0]["containers"]
    sources = [d["env"]["for_each"] for d in container["dynamic"] if "env" in d]
    assert sources == ["${var.env}", "${var.secret_env}"]
    assert container["args"] == "${var.args}"
    probes = {"startup_probe": "/healthz", "liveness_probe": "/healthz"}
    for probe, path in probes.items():
        assert container[probe][0]["http_get"][0]["path"] == path
    for name in ("serve", "worker"):
        assert module().calls[name]["source"] == "./service"


@pytest.mark.parametrize("service", ["serve", "worker"])
def test_every_environment_variable_is_one_the_worker_reads(service: str) -> None:
    given = set(module_env(service))
    assert {"DATABASE_URL", "REDIS_URL", "GOOGLE_CLOUD_PROJECT", "BACKUP_URL"} <= given
    unknown = given - settings_variables() - OTEL_VARIABLES - CLI_VARIABLES
    assert not unknown, f"{service} is given variables nothing reads: {sorted(unknown)}"
    # Cloud Run sets PORT itself, and refuses a service that sets it.
    assert "PORT" not in given


def test_every_secret_referenced_exists() -> None:
    declared = set(
        re.findall(r'"([\w-]+)"', resource("google_secret_manager_secret", "config")["for_each"])
    )
    referenced = set(re.findall(r'config\["([\w-]+)"\]', module().text))
    assert referenced and referenced <= declared, referenced - declared
    for name, value in module().locals["secret_env"].items():
        assert name in settings_variables(), name
        assert "google_secret_manager_secret.config" in value


@pytest.mark.parametrize("folder", [TERRAFORM, SERVICE], ids=["root", "service"])
def test_variables_are_declared_documented_and_used(folder: Path) -> None:
    declared = module(folder).variables
    used = set(re.findall(r"\bvar\.(\w+)", module(folder).text))
    assert used == set(declared), (used - set(declared), set(declared) - used)
    for name, spec in declared.items():
        assert spec.get("description"), f"variable {name} has no description"
    for name, spec in module(folder).outputs.items():
        assert spec.get("description"), f"output {name} has no description"


def test_every_module_argument_is_a_variable_and_none_required_is_missing() -> None:
    declared = module(SERVICE).variables
    required = {n for n, spec in declared.items() if "default" not in spec}
    for name, call in module().calls.items():
        given = set(call) - {"source", "count", "depends_on"}
        assert given <= set(declared), (name, given - set(declared))
        assert required <= given, (name, required - given)


def test_the_example_sets_declared_variables_and_every_required_one() -> None:
    declared = module().variables
    example = load(TERRAFORM / "terraform.tfvars.example")
    assert set(example) <= set(declared), set(example) - set(declared)
    required = {n for n, spec in declared.items() if "default" not in spec}
    assert required <= set(example), required - set(example)


# -- the connection budget ---------------------------------------------------------------


def connections_needed(values: Mapping[str, Any], push: bool) -> int:
    """The budget of locals.tf: every process's pool full in every instance, one
    maintenance run, PostgreSQL's reserved slots and the operators' margin."""
    processes = int(values["processes_per_instance"]) or math.ceil(float(values["cpu"]))
    pool = (int(values["database_pool_size"]) + int(values["database_max_overflow"])) * processes
    workers = 0 if push else int(values["worker_max_instances"]) * pool
    return int(
        values["serve_max_instances"] * pool
        + workers
        + values["retention_streams"]
        + 2
        + values["database_reserved_connections"]
        + values["operator_connections"]
    )


def test_the_budget_in_python_is_the_one_terraform_checks() -> None:
    formula = re.sub(r"\s+", " ", module().locals["connections_needed"])
    assert formula == (
        "${(var.serve_max_instances * local.pool_per_instance"
        " + (local.push ? 0 : var.worker_max_instances * local.pool_per_instance)"
        " + var.retention_streams + 2 + var.database_reserved_connections"
        " + var.operator_connections)}"
    )
    assert module().locals["pool_per_instance"] == (
        "${(var.database_pool_size + var.database_max_overflow) * local.processes}"
    )
    assert module().locals["processes"] == (
        "${var.processes_per_instance > 0 ? var.processes_per_instance : ceil(tonumber(var.cpu))}"
    )
    [check] = load(TERRAFORM / "locals.tf")["check"]
    assert "local.connections_needed <= var.database_max_connections" in json.dumps(check)


@pytest.mark.parametrize("source", ["defaults", "example"])
@pytest.mark.parametrize("push", [False, True])
def test_the_connection_budget_fits_the_database(source: str, push: bool) -> None:
    values = {n: spec["default"] for n, spec in module().variables.items() if "default" in spec}
    if source == "example":
        values.update(load(TERRAFORM / "terraform.tfvars.example"))
    needed = connections_needed(values, push)
    assert needed <= values["database_max_connections"], (needed, values)
